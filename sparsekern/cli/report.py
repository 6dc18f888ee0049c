"""``sparsekern report ADAPTER``: where an adapter's update went (PNG + JSON)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

from . import OneLineErrors


def load_base(spec: str, adapter: Path, metadata: dict):
    """The base model ``--model`` names (its family told from the name first, so a
    mistake is found before the slow load), with the magnetic modules the run wrote
    beside ``adapter`` where it was made with them."""
    from ..integrations import family_for

    base = family_for(spec).load(spec, "cpu")
    if metadata.get("wrapper") == "magnetic":
        from ..magnetism.family import MagneticModel
        from ..magnetism.storage import load_magnetic, sidecar

        base = MagneticModel(base, *load_magnetic(sidecar(adapter), "cpu"))
    return base


def _error(message) -> int:
    """Bad input (or an unwritable folder) as the other commands say it: one line, exit 2."""
    print(f"sparsekern report: error: {message}", file=sys.stderr)
    return 2


def main(argv: Optional[List[str]] = None) -> int:
    parser = OneLineErrors(
        prog="sparsekern report",
        description="Density of an adapter's update by layer, path, irrep order l and element (a PNG and a "
                    "JSON), and whether l = 2 paths take a larger share of it for transition metals.")
    parser.add_argument("adapter", help="adapter file (.safetensors) written by sparsekern")
    parser.add_argument("--out", default=None, help="output folder (default: the adapter's folder; another adapter's "
                        "report there is refused)")
    parser.add_argument("--model", default=None,
                        help="base model (a MACE .model file, a MACE foundation name, or 7net-0): the adapter is "
                             "checked against it (made for it, or an error); needed for adapters written before "
                             "they described their weight groups")
    args = parser.parse_args(argv)

    from ..files import check_output_folder, output_folder
    from ..finetune.adapters import read_adapter
    from ..finetune.report import (adapter_identity, build_report, check_replaceable, profile_lines, summary_line,
                                   verdict_line, write_report)

    adapter = Path(args.adapter)
    stem = adapter.name.removesuffix(".safetensors") + ".report"
    try:
        _, metadata = read_adapter(adapter)  # a bad file is refused before a base model loads
        check_output_folder(args.out or adapter.parent)  # and a folder it cannot be (made once there is a report)
        check_replaceable(args.out or adapter.parent, stem, adapter_identity(adapter))  # (another adapter's report)
        base = load_base(args.model, adapter, metadata) if args.model else None
        report = build_report(adapter, base)
        out = output_folder(args.out or adapter.parent)
    except (ValueError, OSError) as exc:  # (OSError: not found, a folder)
        return _error(exc)
    except ImportError as exc:  # the model's family lives in another environment
        return _error(f"{exc} (MACE models need mace-torch, SevenNet models sevenn)")
    try:
        png, js = write_report(report, out, stem)
    except ValueError as exc:  # (another adapter's report, written there since the check)
        return _error(exc)
    except OSError as exc:
        return _error(f"cannot write the report into {out}: {exc}")
    print(summary_line(report))
    if report["note"]:
        print(report["note"])
    print(verdict_line(report))
    for line in profile_lines(report):  # per element, the update by l
        print(line)
    print(f"wrote {png} and {js}", file=sys.stderr)  # (as finetune's: stdout holds the results)
    return 0
