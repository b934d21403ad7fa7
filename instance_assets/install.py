#!/usr/bin/env python3
"""Stage 2 entry point: run the installer from the extracted bundle (see docs/agent.md)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from spotguard_agent.installer import main

if __name__ == "__main__":
    sys.exit(main())
