"""The demo job: two endpoints on this machine and a workload that keeps writing."""
