"""Where files live (local or any pyarrow filesystem), atomic writes, the run directory and its lock, schemas."""
