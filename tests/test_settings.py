"""Settings: defaults, config file, environment (highest), explicit arguments."""

from features.settings import Settings


def test_defaults(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    for var in ("HOTSPOTS_CONFIG", "HOTSPOTS_DATA_DIR", "HOTSPOTS_H3_RESOLUTION", "HOTSPOTS_SHIFT_STARTS",
                "HOTSPOTS_MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    s = Settings()
    assert s.h3_resolution == 9 and s.shift_starts == ["06:00", "14:00", "22:00"]
    assert s.tracking_uri.startswith("sqlite:///") and s.tracking_uri.endswith("data/mlflow.db")


def test_config_file_then_environment(monkeypatch, tmp_path):
    config = tmp_path / "hotspots.toml"
    config.write_text('[hotspots]\nh3_resolution = 8\nshift_starts = ["07:00", "19:00"]\ndata_dir = "/srv/hotspots"\n')
    monkeypatch.setenv("HOTSPOTS_CONFIG", str(config))
    monkeypatch.delenv("HOTSPOTS_H3_RESOLUTION", raising=False)
    monkeypatch.delenv("HOTSPOTS_DATA_DIR", raising=False)
    s = Settings()
    assert s.h3_resolution == 8 and s.shift_starts == ["07:00", "19:00"] and str(s.data_dir) == "/srv/hotspots"
    monkeypatch.setenv("HOTSPOTS_H3_RESOLUTION", "9")
    monkeypatch.setenv("HOTSPOTS_SHIFT_STARTS", "06:00,18:00")
    monkeypatch.setenv("HOTSPOTS_MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    s = Settings()
    assert s.h3_resolution == 9 and s.shift_starts == ["06:00", "18:00"] and s.tracking_uri == "http://127.0.0.1:5000"
    assert Settings(h3_resolution=7).h3_resolution == 7


def test_config_file_top_level_and_service_fields(monkeypatch, tmp_path):
    """A config file without a [hotspots] table is read from its top level; service settings live in the same
    object as the data settings."""
    config = tmp_path / "plain.toml"
    config.write_text('h3_resolution = 10\ndefault_k = 7\nmodel_refresh_seconds = 5\n')
    monkeypatch.setenv("HOTSPOTS_CONFIG", str(config))
    for var in ("HOTSPOTS_H3_RESOLUTION", "HOTSPOTS_DEFAULT_K", "HOTSPOTS_MODEL_REFRESH_SECONDS"):
        monkeypatch.delenv(var, raising=False)
    s = Settings()
    assert (s.h3_resolution, s.default_k, s.model_refresh_seconds) == (10, 7, 5.0)
    monkeypatch.setenv("HOTSPOTS_DEFAULT_K", "3")
    assert Settings().default_k == 3


def test_mlflow_usage_telemetry_is_off_unless_the_user_turns_it_on(monkeypatch):
    """A police deployment's tracking never phones MLflow's vendor: the product disables MLflow 3's telemetry,
    and an explicit user setting still wins."""
    import runpy

    from mlflow.environment_variables import MLFLOW_DISABLE_TELEMETRY

    import features.settings

    # features/settings.py's own code runs as on import, in a fresh namespace (runpy, not a reload: the loaded
    # module and its Settings class stay the ones the other tests hold), once without the variable and once with
    # the user's; MLflow's own reading of its switch decides (its other heuristics, e.g. "running under pytest",
    # are beside the point). Two Python processes importing mlflow did this before: 7 CPU-s, now ~0.1.
    for value, expected in ((None, True), ("false", False)):
        if value is None:
            monkeypatch.delenv("MLFLOW_DISABLE_TELEMETRY", raising=False)
        else:
            monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", value)
        runpy.run_path(features.settings.__file__)
        assert MLFLOW_DISABLE_TELEMETRY.get() is expected
