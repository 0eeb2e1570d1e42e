"""Where each party's state lives, sealed or plain (decided once): keyrings, the run directory, a site's state."""

from fedsecure.store.files import StateFiles
from fedsecure.store.keyrings import coordinator_keyring, site_keyring
from fedsecure.store.rundir import RunDir, new_run_id
from fedsecure.store.site_state import SiteState

__all__ = ["RunDir", "SiteState", "StateFiles", "coordinator_keyring", "new_run_id", "site_keyring"]
