"""targets/weights.py's pure parts: what of a command line may name a model, the hub
caches of an environment, a repository id's directory, read permission by mode bits."""

from __future__ import annotations

import os
import stat

from gpusnap.targets.weights import Creds, arguments, creds_of, hub_dirs, readable, repo_dir


def test_arguments_take_values_of_options_and_leave_the_program_and_flags():
    argv = ["python", "-m", "vllm", "serve", "--model=/m/x", "--port", "8000", "-tp=2", "", "a\0b"]
    assert arguments(argv) == ["vllm", "serve", "/m/x", "8000", "2"]


def test_hub_dirs_in_the_librarys_order_absolute_only():
    env = {"HF_HUB_CACHE": "/c/hub", "HF_HOME": "/hf", "XDG_CACHE_HOME": "rel", "HOME": "/root"}
    assert hub_dirs(env) == ["/c/hub", "/hf/hub", "/root/.cache/huggingface/hub"]
    assert hub_dirs({}) == []


def test_repo_dir_of_an_id_and_none_of_anything_else():
    assert repo_dir("meta-llama/Llama-3.1-8B") == "models--meta-llama--Llama-3.1-8B"
    for arg in ("/abs/path", "a/b/c", "org/..", "../x", "name", "org/na me"):
        assert repo_dir(arg) is None, arg


def _st(mode, uid=1000, gid=1000):
    return os.stat_result((stat.S_IFREG | mode, 0, 0, 1, uid, gid, 10, 0, 0, 0))


def test_readable_by_the_class_the_user_falls_in():
    owner, member, other = Creds(1000, 5), Creds(2000, 1000), Creds(3000, 3000, frozenset({7}))
    assert readable(_st(0o400), owner) and not readable(_st(0o044), owner)   # the owner's bits only
    assert readable(_st(0o040), member) and not readable(_st(0o404), member)
    assert readable(_st(0o040, gid=7), other)                            # a supplementary group
    assert readable(_st(0o004), other) and not readable(_st(0o440), other)
    assert readable(_st(0o000), Creds(0, 0))


def test_creds_from_status_take_the_fs_ids():
    text = "Name:\tpython\nUid:\t1\t2\t3\t4\nGid:\t5\t6\t7\t8\nGroups:\t9 10 \n"
    assert creds_of(text) == Creds(4, 8, frozenset({9, 10}))
