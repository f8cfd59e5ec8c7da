#!/usr/bin/env python3
"""Render the Helm chart etc/helm/llm-optimizer to stdout, offline, with Helm's own template
engine (helm-python-sdk binds Helm's Go SDK; no helm binary or chart repository needed).

    python scripts/render_chart.py [-f values.yaml ...] [--set key=value ...] [--name NAME]

``--set`` takes dotted keys and YAML values (``--set ingest.replicas=3``). The output is the
manifests in template order, ready for ``kubectl apply -f -`` or kubernetes-validate.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

CHART = Path(__file__).resolve().parent.parent / "etc" / "helm" / "llm-optimizer"


def merge(into: dict[str, Any], more: dict[str, Any]) -> dict[str, Any]:
    for key, value in more.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            merge(into[key], value)
        else:
            into[key] = value
    return into


def setting(text: str) -> dict[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise SystemExit(f"--set takes key=value, not {text!r}")
    node: dict[str, Any] = {}
    parts = key.split(".")
    cursor = node
    for part in parts[:-1]:
        cursor = cursor.setdefault(part, {})
    cursor[parts[-1]] = yaml.safe_load(value)
    return node


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-f", "--values", action="append", default=[], help="a values file")
    parser.add_argument("--set", action="append", default=[], dest="sets",
                        help="key=value (dotted key, YAML value)")
    parser.add_argument("--name", default="llm-optimizer", help="release name")
    parser.add_argument("--namespace", default="llm-optimizer")
    args = parser.parse_args()
    try:
        import helm_python
    except ImportError:
        raise SystemExit("helm-python-sdk is not installed: pip install helm-python-sdk") \
            from None
    values: dict[str, Any] = {}
    for path in args.values:
        merge(values, yaml.safe_load(Path(path).read_text()) or {})
    for text in args.sets:
        merge(values, setting(text))
    from helm_python.errors import HelmRenderError

    try:
        with helm_python.Chart.load(str(CHART)) as chart:
            rendered = chart.render(values, name=args.name, namespace=args.namespace,
                                    is_install=True)
    except HelmRenderError as exc:
        raise SystemExit(f"render_chart: {exc}") from None
    for path, text in rendered.items():
        if path.endswith((".yaml", ".yml")) and text.strip():
            sys.stdout.write(f"---\n# Source: {path}\n{text.strip()}\n")


if __name__ == "__main__":
    main()
