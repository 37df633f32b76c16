"""edgeforge-agent: runs on a device, connects out to the coordinator, measures artifacts, reports.

Installed on its own as the `edgeforge_agent` package (pip install edgeforge_agent-*.whl[extras]);
in the monorepo the same files are `clients.agent`. Modules import each other relatively and never
import the monorepo's shared/ or services/, so both work.
"""
__version__ = "0.5.0"
