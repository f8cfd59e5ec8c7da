"""Config loading: defaults, environment overrides, errors, YAML, and the optimizerd CLI."""
from __future__ import annotations

import os
import subprocess
import textwrap
import tomllib

import pytest

from ipc.config import BUILTIN_SERVICES, Config
from ipc.config_loader import ConfigError, config_hash, load_config

CLI_TIMEOUT = 60


def write(tmp_path, text: str, name: str = "optimizer.toml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def optimizerd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("LLM_OPTIMIZER")}
    base.update(env or {})
    return subprocess.run(["optimizerd", *args], capture_output=True, text=True, env=base,
                          timeout=CLI_TIMEOUT, stdin=subprocess.DEVNULL)


# --- defaults and overrides --------------------------------------------------------------------

def test_defaults_without_a_file():
    config = load_config(None, environ={})
    assert config == Config()
    sup = config.supervisor
    assert (sup.heartbeat_interval, sup.heartbeat_timeout, sup.max_restarts,
            sup.restart_window, sup.backoff_base) == (1.0, 5.0, 5, 60.0, 0.1)
    assert config.admin.listen == "127.0.0.1:9090"
    assert config.rest_api.listen == "127.0.0.1:8080"
    assert config.grpc_api.listen == "127.0.0.1:50051"
    assert list(config.enabled_services()) == list(BUILTIN_SERVICES)
    assert config.processor.depends_on == ["storage", "collector"]


def test_a_file_sets_only_what_it_names(tmp_path):
    path = write(tmp_path, """
        [supervisor]
        heartbeat_interval = 0.25
        [rest_api]
        listen = "127.0.0.1:18080"
        [services.extra]
        entrypoint = "workers.stub:StubWorker"
        depends_on = ["storage"]
        settings = { ready_delay = 0.5 }
    """)
    config = load_config(path, environ={})
    assert config.supervisor.heartbeat_interval == 0.25
    assert config.supervisor.heartbeat_timeout == 5.0
    assert config.rest_api.listen == "127.0.0.1:18080"
    extra = config.services["extra"]
    assert extra.settings == {"ready_delay": 0.5} and extra.depends_on == ["storage"]
    assert "extra" in config.enabled_services()


def test_environment_overrides_file_and_defaults(tmp_path):
    path = write(tmp_path, """
        [supervisor]
        heartbeat_interval = 0.25
    """)
    env = {"LLM_OPTIMIZER__SUPERVISOR__HEARTBEAT_INTERVAL": "0.5",
           "LLM_OPTIMIZER__SUPERVISOR__MAX_RESTARTS": "9",
           "LLM_OPTIMIZER__SUPERVISOR__WATCH_CONFIG": "true",
           "LLM_OPTIMIZER__REST_API__LISTEN": "0.0.0.0:8081",
           "LLM_OPTIMIZER__PROCESSOR__DEPENDS_ON": '["storage"]',
           "LLM_OPTIMIZER__SERVICES__EXTRA__ENTRYPOINT": "workers.stub:StubWorker",
           "UNRELATED": "x"}
    config = load_config(path, environ=env)
    assert config.supervisor.heartbeat_interval == 0.5
    assert config.supervisor.max_restarts == 9
    assert config.supervisor.watch_config is True
    assert config.rest_api.listen == "0.0.0.0:8081"
    assert config.processor.depends_on == ["storage"]
    assert config.services["extra"].entrypoint == "workers.stub:StubWorker"


def test_environment_override_from_the_process_environment(monkeypatch):
    monkeypatch.setenv("LLM_OPTIMIZER__ADMIN__LISTEN", "127.0.0.1:9999")
    assert load_config(None).admin.listen == "127.0.0.1:9999"


def test_config_hash_is_stable_and_tracks_changes():
    a = load_config(None, environ={})
    b = load_config(None, environ={})
    c = load_config(None, environ={"LLM_OPTIMIZER__SUPERVISOR__MAX_RESTARTS": "6"})
    assert config_hash(a) == config_hash(b) != config_hash(c)
    assert len(config_hash(a)) == 12


# --- errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,key,words,value", [
    ('[supervisor]\nheartbeat_interval = "fast"\n', "supervisor.heartbeat_interval",
     ["expected", "float", "str"], "fast"),
    ("[supervisor]\nmax_restarts = -1\n", "supervisor.max_restarts", [">= 0"], -1),
    ("[supervisor]\nheartbeat_interval = 0\n", "supervisor.heartbeat_interval", ["> 0"], 0),
    ('[rest_api]\nlisten = "nohost"\n', "rest_api.listen", ["host:port"], "nohost"),
    ('[observability]\nlog_level = "loud"\n', "observability.log_level",
     ["expected one of", "'debug'", "'error'"], "loud"),
    ("[supervisor]\nheartbeat_timeout = 0.5\nheartbeat_interval = 1.0\n",
     "supervisor.heartbeat_timeout", ["greater than", "heartbeat_interval"], 0.5),
    ('[services.x]\nentrypoint = "workers.stub:StubWorker"\nprocesses = 0\n',
     "services.x.processes", [">= 1"], 0),
    ('[services.x]\nentrypoint = "workers.stub:StubWorker"\ndepends_on = ["nope"]\n',
     "services.x.depends_on[0]", ["no such service"], "nope"),
    ('[collector]\ndepends_on = ["storage"]\n[storage]\nenabled = false\n',
     "collector.depends_on[0]", ["disabled"], "storage"),
    ('[services.Bad-Name]\nentrypoint = "workers.stub:StubWorker"\n', "services.Bad-Name",
     ["lowercase"], "Bad-Name"),
    ('[services.x]\nsettings = {}\n', "services.x.entrypoint", ["required"], None),
    ("[processor]\nsliding_window_s = 250\n", "processor.sliding_window_s",
     ["multiple of", "sliding_step_s"], 250),
    ("[processor]\nanalysis_interval_s = 90\n", "processor.analysis_interval_s",
     ["multiple of", "tumbling_window_s"], 90),
    ("[processor.canary]\nstages = [5, 50, 25]\n", "processor.canary.stages",
     ["rise strictly", "100"], [5.0, 50.0, 25.0]),
    ("[processor.canary]\nstages = [5, 50]\n", "processor.canary.stages", ["end at 100"],
     [5.0, 50.0]),
    ('[collector]\nrate_limit_events_per_s = -1\n', "collector.rate_limit_events_per_s",
     [">= 0"], -1),
])
def test_errors_name_key_path_expectation_and_value(tmp_path, text, key, words, value):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={})
    exc = err.value
    assert exc.key == key
    for word in words:
        assert word in exc.problem
    if value is not None:
        assert exc.value == value
        assert repr(value) in str(exc)
    assert str(exc).startswith(key + ": ")
    assert path in str(exc)


@pytest.mark.parametrize("text,key", [
    ("[supervisor]\nheartbeat_intervall = 1\n", "supervisor.heartbeat_intervall"),
    ('[services.extra]\nentrypoint = "workers.stub:StubWorker"\nsetings = {}\n',
     "services.extra.setings"),
    ("[services]\nextra = 5\n", "services.extra"),
])
def test_unknown_or_misplaced_key_is_named(tmp_path, text, key):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={})
    assert err.value.key == key
    assert "unknown key" in err.value.problem or "expected object" in err.value.problem


def test_bad_environment_value_names_the_variable():
    with pytest.raises(ConfigError) as err:
        load_config(None, environ={"LLM_OPTIMIZER__SUPERVISOR__MAX_RESTARTS": "many"})
    assert err.value.key == "supervisor.max_restarts"
    assert err.value.value == "many"
    assert "LLM_OPTIMIZER__SUPERVISOR__MAX_RESTARTS" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config(None, environ={"LLM_OPTIMIZER__NOSECTIONKEY": "1"})
    assert "LLM_OPTIMIZER__SECTION__KEY" in str(err.value)


def test_syntax_errors_and_missing_files(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "[supervisor\nx = 1\n"), environ={})
    assert "invalid TOML" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config(str(tmp_path / "missing.toml"), environ={})
    assert "cannot read" in str(err.value) and "missing.toml" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "a: [1, 2\n", "bad.yaml"), environ={})
    assert "invalid YAML" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "- 1\n- 2\n", "list.yaml"), environ={})
    assert "top level" in str(err.value)


def test_cycle_is_a_config_error_naming_it(tmp_path):
    path = write(tmp_path, """
        [services.a]
        entrypoint = "workers.stub:StubWorker"
        depends_on = ["c"]
        [services.b]
        entrypoint = "workers.stub:StubWorker"
        depends_on = ["a"]
        [services.c]
        entrypoint = "workers.stub:StubWorker"
        depends_on = ["b"]
    """)
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={})
    text = str(err.value)
    assert "dependency cycle" in text
    for name in ("a", "b", "c"):
        assert f"{name} -> " in text or f"-> {name}" in text


# --- YAML --------------------------------------------------------------------------------------

def test_yaml_file_is_read_like_toml(tmp_path):
    path = write(tmp_path, """
        supervisor:
          heartbeat_interval: 0.3
          max_restarts: 2
        rest_api:
          listen: "127.0.0.1:18081"
        services:
          extra:
            entrypoint: "workers.stub:StubWorker"
            settings: {reload: live}
    """, "optimizer.yaml")
    config = load_config(path, environ={})
    assert config.supervisor.heartbeat_interval == 0.3
    assert config.supervisor.max_restarts == 2
    assert config.rest_api.listen == "127.0.0.1:18081"
    assert config.services["extra"].settings == {"reload": "live"}
    bad = write(tmp_path, "supervisor:\n  max_restarts: lots\n", "bad.yml")
    with pytest.raises(ConfigError) as err:
        load_config(bad, environ={})
    assert err.value.key == "supervisor.max_restarts"


def test_empty_yaml_means_defaults(tmp_path):
    assert load_config(write(tmp_path, "", "empty.yaml"), environ={}) == Config()


# --- the optimizerd CLI ------------------------------------------------------------------------

@pytest.mark.timeout(120)
def test_print_default_config_round_trips_through_check_config(tmp_path):
    printed = optimizerd("print-default-config")
    assert printed.returncode == 0, printed.stderr
    text = printed.stdout
    doc = tomllib.loads(text)  # valid TOML
    for section in ("supervisor", "observability", "admin", *BUILTIN_SERVICES):
        assert f"[{section}]" in text and section in doc
    assert "# " in text  # annotated
    assert load_config(write(tmp_path, text), environ={}) == Config()
    path = write(tmp_path, text, "default.toml")
    checked = optimizerd("check-config", "-c", path)
    assert checked.returncode == 0, checked.stderr
    assert "ok" in checked.stdout
    alias = optimizerd("--validate-config", "-c", path)
    assert alias.returncode == 0, alias.stderr
    flag = optimizerd("--print-default-config")
    assert flag.returncode == 0 and flag.stdout == text


@pytest.mark.timeout(120)
def test_check_config_exits_2_with_the_key_path(tmp_path):
    path = write(tmp_path, '[supervisor]\nbackoff_base = "soon"\n')
    for args in (["check-config", "-c", path], ["--validate-config", "-c", path]):
        r = optimizerd(*args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert "supervisor.backoff_base" in r.stderr
        assert "'soon'" in r.stderr
    r = optimizerd("check-config", env={"LLM_OPTIMIZER__ADMIN__LISTEN": "nowhere"})
    assert r.returncode == 2 and "admin.listen" in r.stderr
    assert "LLM_OPTIMIZER__ADMIN__LISTEN" in r.stderr
    r = optimizerd("check-config")
    assert r.returncode == 0 and "built-in defaults" in r.stdout
    r = optimizerd("check-config", "-c", write(tmp_path, "[supervisor\n", "broken.toml"))
    assert r.returncode == 2 and "invalid TOML" in r.stderr
    r = optimizerd("check-config", "--no-such-flag")
    assert r.returncode == 2


@pytest.mark.timeout(120)
def test_check_config_reads_the_environment_variable_for_the_file(tmp_path):
    path = write(tmp_path, "[supervisor]\nmax_restarts = -3\n")
    r = optimizerd("check-config", env={"LLM_OPTIMIZER_CONFIG": path})
    assert r.returncode == 2 and "supervisor.max_restarts" in r.stderr


def test_runtime_dir_too_long_for_sockets_is_a_config_error(tmp_path):
    long_dir = "/tmp/" + "r" * 100
    with pytest.raises(ConfigError) as err:
        load_config(None, environ={"LLM_OPTIMIZER__SUPERVISOR__RUNTIME_DIR": long_dir})
    assert err.value.key == "supervisor.runtime_dir" and err.value.value == long_dir
    assert "107" in err.value.problem
    fits = "/tmp/" + "r" * 60
    assert load_config(None, environ={"LLM_OPTIMIZER__SUPERVISOR__RUNTIME_DIR": fits})


@pytest.mark.timeout(120)
def test_start_with_an_unusable_runtime_dir_exits_2_before_doing_anything(tmp_path):
    path = write(tmp_path, f"""
        [supervisor]
        runtime_dir = "{tmp_path}/{"d" * 100}"
    """)
    for args in (["check-config", "-c", path], ["start", "-c", path]):
        r = optimizerd(*args)
        assert r.returncode == 2, (args, r.stderr[-2000:])
        assert "supervisor.runtime_dir" in r.stderr and "Traceback" not in r.stderr
    assert not os.path.exists(f"{tmp_path}/{'d' * 100}")
