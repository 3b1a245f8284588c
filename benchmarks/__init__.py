"""The project's benchmarks: scripts run from the repository root (`python benchmarks/<script>.py`), their tasks
(`benchmarks.tasks`) and shared helpers. Not part of the installed `hpt_trl` library."""
