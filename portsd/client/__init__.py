"""The client side: installing packages into a root (and, beside this, resolving and
downloading them from LAN caches).

The installed-package database and transactions are re-exported here::

    from portsd.client import Installed, InstallReason
"""

from portsd.client.db import (
    InstalledFile,
    InstalledPackage,
    InstallReason,
    PackageDb,
    TransactionRecord,
)
from portsd.client.transaction import (
    Checkpoint,
    Installed,
    Phase,
    Progress,
    Recovery,
    RecoveryAction,
    Transaction,
    TransactionResult,
)

__all__ = [
    "Checkpoint",
    "InstallReason",
    "Installed",
    "InstalledFile",
    "InstalledPackage",
    "PackageDb",
    "Phase",
    "Progress",
    "Recovery",
    "RecoveryAction",
    "Transaction",
    "TransactionRecord",
    "TransactionResult",
]
