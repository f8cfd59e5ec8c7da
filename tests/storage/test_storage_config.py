"""Storage keys that only make sense together are checked before anything starts."""
from __future__ import annotations

import pytest

from ipc.config_loader import ConfigError, config_from_document


def test_storage_runs_as_one_process() -> None:
    with pytest.raises(ConfigError) as error:
        config_from_document({"storage": {"processes": 2}}, {})
    assert error.value.key == "storage.processes"


def test_postgres_backend_needs_a_dsn_from_file_or_environment() -> None:
    with pytest.raises(ConfigError) as error:
        config_from_document({"storage": {"backend": "postgres"}}, {})
    assert error.value.key == "storage.postgres_dsn"
    config = config_from_document({"storage": {"backend": "postgres"}},
                                  {"LLM_OPTIMIZER__STORAGE__POSTGRES_DSN": "postgresql://u@h/db"})
    assert config.storage.postgres_dsn == "postgresql://u@h/db"
