"""`bitcpm env`: device, versions, visible-device variables and diagnoses of the known pitfalls."""

from __future__ import annotations

import typer
from rich.markup import escape
from rich.table import Table

from bitcpm_cli.cli.output import LEVEL_STYLE, out, print_json


def _size(num: int | None) -> str:
    return "-" if not num else f"{num / 2**30:.1f} GiB"


def env(
    device: str = typer.Option("auto", "--device", help="Device to resolve: auto, cpu, cuda[:N], npu[:N], mps."),
    json_output: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
) -> None:
    """Report Python, torch, torch_npu/CANN, devices and environment variables, and diagnose known pitfalls.

    Exit 1 when a diagnosis is an error (e.g. ASCEND_RT_VISIBLE_DEVICES hiding every NPU).
    """
    from bitcpm_cli.core.runtime.environment import collect_environment, require_no_errors

    report = collect_environment(device)
    if json_output:
        print_json(report)
    else:
        _render(report)
    require_no_errors(report)


def _render(report: dict) -> None:
    versions = Table(title="bitcpm environment", show_header=False)
    versions.add_row("bitcpm", report["bitcpm"])
    versions.add_row("python", f"{report['python']} ({report['platform']})")
    for name, version in report["packages"].items():
        versions.add_row(name, version or "[dim]not installed[/]")
    build = report.get("torch_build") or {}
    if build.get("cuda") or build.get("hip"):
        versions.add_row("torch build", f"CUDA {build['cuda']}" if build.get("cuda") else f"HIP {build['hip']}")
    versions.add_row("CANN", report["cann"] or "[dim]not found[/]")
    versions.add_row("selected device", report["selected"] or f"[red]{escape(report['selection_error'] or '-')}[/]")
    versions.add_row("distributed backend", report["distributed_backend"] or "-")
    deepspeed = report.get("deepspeed")
    versions.add_row("deepspeed", "[dim]not installed[/]" if deepspeed is None else
                     f"{deepspeed['version']} (accelerator {deepspeed['accelerator'] or '-'})")
    vllm = report.get("vllm")
    versions.add_row("vllm", "[dim]not installed[/]" if vllm is None else
                     f"{vllm['version'] or '-'} ({vllm['distribution'] or '-'}, platform {vllm['platform'] or '-'})")
    out.print(versions)

    devices = Table(title="devices")
    for column in ("device", "name", "memory"):
        devices.add_column(column)
    for entry in report["devices"]:
        devices.add_row(entry["device"], escape(str(entry["name"])), _size(entry["memory_bytes"]))
    out.print(devices)

    if report["variables"]:
        variables = Table(title="environment variables")
        variables.add_column("variable")
        variables.add_column("value")
        for key, value in report["variables"].items():
            variables.add_row(key, escape(value))
        out.print(variables)

    if not report["diagnoses"]:
        out.print(f"[{LEVEL_STYLE['ok']}]no problems found[/]")
    for d in report["diagnoses"]:
        out.print(f"[{LEVEL_STYLE[d['level']]}]{d['level']}:[/] {escape(d['message'])}", soft_wrap=True)
        if d["hint"]:
            out.print(f"  [bold]hint:[/] {escape(d['hint'])}", soft_wrap=True)
