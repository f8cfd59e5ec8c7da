"""optimizerd: start the supervisor, check or print the configuration.

Exit codes: 0 ok, 1 could not run (already running, port taken, ...), 2 config or usage error.
"""
from __future__ import annotations

import sys

import click
import msgspec

from ipc.config import Config
from ipc.config_loader import ConfigError, load_config

CONFIG_ENV = "LLM_OPTIMIZER_CONFIG"
config_option = click.option(
    "-c", "--config", "config_path", type=click.Path(dir_okay=False), envvar=CONFIG_ENV,
    help=f"TOML or YAML config file (default: built-in defaults; env {CONFIG_ENV}).")


def load_or_exit(path: str | None) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        click.echo(f"optimizerd: config error: {exc}", err=True)
        sys.exit(2)


def print_default(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        from ipc.config_render import render_default_config

        click.echo(render_default_config(), nl=False)
        ctx.exit(0)


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--print-default-config", is_flag=True, is_eager=True, expose_value=False,
              callback=print_default, help="Alias of `print-default-config`.")
@click.option("--validate-config", is_flag=True, help="Alias of `check-config`.")
@config_option
@click.pass_context
def main(ctx: click.Context, validate_config: bool, config_path: str | None) -> None:
    """LLM Auto Optimizer daemon."""
    if validate_config:
        ctx.invoke(check_config, config_path=config_path)
    elif ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())
        ctx.exit(2)


@main.command("check-config")
@config_option
def check_config(config_path: str | None) -> None:
    """Validate the config (file plus LLM_OPTIMIZER__* environment); exit 0 or 2."""
    load_or_exit(config_path)
    click.echo(f"{config_path or 'built-in defaults'}: ok")


@main.command("print-default-config")
def print_default_config() -> None:
    """Print the full annotated default config (TOML)."""
    from ipc.config_render import render_default_config

    click.echo(render_default_config(), nl=False)


@main.command("start")
@config_option
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
              help="Overrides observability.log_level.")
@click.option("--json-logs", is_flag=True, default=None,
              help="One JSON object per log line (overrides observability.json_logs).")
def start(config_path: str | None, log_level: str | None, json_logs: bool | None) -> None:
    """Run the supervisor and every enabled service in the foreground."""
    def with_overrides(config: Config) -> Config:
        """The command line's options over the file's; applied again at every reload."""
        obs = config.observability
        obs = msgspec.structs.replace(obs, log_level=log_level or obs.log_level,
                                      json_logs=obs.json_logs if json_logs is None else json_logs)
        return msgspec.structs.replace(config, observability=obs)

    config = with_overrides(load_or_exit(config_path))

    from ipc.logrecords import configure_logging
    from supervisor.daemon import AlreadyRunning, Daemon

    obs = config.observability
    configure_logging("supervisor", obs.log_level, obs.json_logs)
    try:
        code = Daemon(config, config_path,
                      load=lambda: with_overrides(load_config(config_path))).run()
    except AlreadyRunning as exc:
        click.echo(f"optimizerd: {exc}", err=True)
        sys.exit(1)
    except OSError as exc:
        click.echo(f"optimizerd: cannot start: {exc}", err=True)
        sys.exit(1)
    sys.exit(code)


if __name__ == "__main__":
    main()
