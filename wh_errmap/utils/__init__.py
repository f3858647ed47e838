"""Services every layer uses: atomic writes, the cache folder, console progress, signal
handling, the run's workdir (config record, locks), the device mesh and text formatting."""
