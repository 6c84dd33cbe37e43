"""The application: wiring (the settings read and passed on as plain values), the worker loop and
its heartbeat, the frame pipeline (file -> file), the task (job -> result), job records, work
directories, health and metrics, operators' commands and the environment report."""
