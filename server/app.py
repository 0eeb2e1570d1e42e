"""fedsecure ServerApp (``serverapp = "server.app:app"``): thin; the logic is in fedsecure."""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedsecure.config import SimulationConfig
from fedsecure.federation.server import Coordinator
from fedsecure.runs import RunDir
from fedsecure.storage import coordinator_keyring

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = SimulationConfig.from_run_config(context.run_config)
    path = str(context.run_config["run-dir"])
    run_dir = RunDir(path, coordinator_keyring(cfg, path), cfg.storage.chunk_size)
    run_dir.write_config(cfg.to_dict())
    Coordinator(cfg, run_dir).run(grid)
