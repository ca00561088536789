"""Tables, statistics and figures from run folders (never imports training code)."""

from atlasfl.report.runs import RunRecord, find_runs
from atlasfl.summary import summarize
from atlasfl.report.console import format_table
from atlasfl.report.write import write_report
from atlasfl.runfiles import read_run

__all__ = ["RunRecord", "find_runs", "format_table", "read_run", "summarize", "write_report"]
