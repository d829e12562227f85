"""Builders on a Dask cluster: the daemon submits build orders to a Dask scheduler
(``dispatch``), workers started with ``--preload portsd.cluster.worker`` build them
(``worker``), fed by the daemon's repository and distfiles over HTTP and uploading the
package back (``remote``). See docs/cluster.md."""
