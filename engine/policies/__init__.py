"""Admission policies of the scheduler, one file each; `configs/scheduler/<name>.yaml` picks one."""
