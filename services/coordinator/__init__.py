"""The coordinator: builds as long-running operations, the artifact store, devices, selection, reports."""
