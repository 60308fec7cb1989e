"""The full red-team run: ``.venv/bin/python -m tests.redteam`` (add ``DATABASE_URL`` to run
it on PostgreSQL). It runs the suite's pytest test over every scenario and prints its report;
the exit status is pytest's (non-zero while attacks get through or benign tasks are blocked)."""

import os
import sys
from pathlib import Path

import pytest

if __name__ == "__main__":
    os.environ["REDTEAM_FULL"] = "1"
    test = Path(__file__).with_name("test_redteam.py")
    sys.exit(pytest.main(["-q", "-s", "-p", "no:cacheprovider", str(test)]))
