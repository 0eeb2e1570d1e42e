"""fedsecure ServerApp (``serverapp = "server.app:app"``): thin; the logic is in fedsecure."""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedsecure.config import SimulationConfig
from fedsecure.federation.coordinator import Coordinator
from fedsecure.store.keyrings import coordinator_keyring
from fedsecure.store.rundir import RunDir, write_failure

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Flower's ServerApp entry point: the coordinator's round loop on this run's Grid."""
    path = str(context.run_config["run-dir"])
    try:
        cfg = SimulationConfig.from_run_config(context.run_config)
        run_dir = RunDir(path, coordinator_keyring(cfg.storage, path), cfg.storage.chunk_size)
        if not (run_dir.path / "config.yaml").exists():  # `fedsecure simulate` wrote it, with the simulated sites
            run_dir.write_config({k: v for k, v in cfg.to_dict().items() if k != "site"})  # no site setting here
        Coordinator(cfg, run_dir).run(grid)
    except Exception as e:
        write_failure(path, e)  # `fedsecure server` / `simulate` print it; Flower's log has the traceback
        raise
