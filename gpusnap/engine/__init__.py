"""The one place that orders the steps of a dump and a restore: plan(), then execute()."""
