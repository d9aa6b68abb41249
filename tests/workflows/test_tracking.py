"""MLflow never stalls training: a real `mlflow server` stopped in the middle of a run and started
again; runs a command opened are ended on every exit path."""

import logging
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.fixtures.mlflow_server import free_port, start_mlflow_server, stop_process, wait_http
from workflows import tracking
from workflows.config import load_config

pytestmark = pytest.mark.integration


def _wait_until(condition) -> None:
    """Poll `condition` (pytest's own timeout bounds the wait; the test asserts no duration)."""
    while not condition():
        time.sleep(0.2)


@pytest.fixture
def restartable_mlflow(tmp_path, monkeypatch):
    """(uri, stop, start): a private MLflow server that the test can stop and start on the same port and store."""
    for key, value in tracking.SENDER_ENV.items():
        monkeypatch.setenv(key, value)
    root, port = tmp_path / "mlflow", free_port()
    uri = f"http://127.0.0.1:{port}"
    procs = []

    def start() -> None:
        procs.append(start_mlflow_server(root, port))
        wait_http(f"{uri}/health", timeout=120, proc=procs[-1])

    def stop() -> None:
        stop_process(procs[-1])

    start()
    yield uri, stop, start
    stop()


def test_logging_goes_on_through_a_tracking_outage_and_the_steps_arrive_once_each(restartable_mlflow, caplog):
    uri, stop, start = restartable_mlflow
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("outage")).info.run_id
    logger = tracking.RunLogger(uri, run_id)
    caplog.set_level(logging.WARNING, logger="workflows.tracking")

    for step in range(1, 11):
        logger.metrics({"total": 1.0 / step}, step=step)
    assert logger.flush(), "the server is up: everything queued is delivered"
    stop()
    for step in range(11, 31):  # the training thread only queues: these return while the server is down
        logger.metrics({"total": 1.0 / step}, step=step)
    _wait_until(lambda: logger.failures > 0)  # the sender noticed the outage
    assert not logger.flush(), "during an outage flush returns at once instead of stalling"
    start()
    logger.close()

    steps = sorted(m.step for m in client.get_metric_history(run_id, "total"))
    assert steps == list(range(1, 31))
    assert (logger.dropped, client.get_run(run_id).data.metrics["iteration"]) == (0, 30)
    warnings = [r.getMessage() for r in caplog.records]
    assert any("MLflow unreachable" in w for w in warnings)
    assert any(f"reachable again after {logger.failures} failed attempt(s)" in w for w in warnings)


def test_replayed_steps_are_not_logged_twice_and_a_full_buffer_drops_with_a_count(restartable_mlflow, caplog):
    uri, stop, start = restartable_mlflow
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("replay")).info.run_id
    first = tracking.RunLogger(uri, run_id)
    for step in range(1, 8):
        first.metrics({"total": float(step)}, step=step)
    first.close()

    # a restored worker replays steps 5..7 (checkpoint at 4) and goes on; its buffer holds 5 items
    again = tracking.RunLogger(uri, run_id, buffer=5)
    again.metrics({"resumed_at_iteration": 4.0}, step=4, replayed_ok=True)
    for step in range(5, 8):
        again.metrics({"total": float(step) + 0.5}, step=step)
    assert again.flush()
    stop()
    caplog.set_level(logging.WARNING, logger="workflows.tracking")
    again.metrics({"total": 8.5}, step=8)
    _wait_until(lambda: again.failures > 0)  # the sender holds step 8, retrying it, so the buffer fills up
    for step in range(9, 15):
        again.metrics({"total": float(step) + 0.5}, step=step)
    start()
    again.close()

    history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "total"))
    # 1..7 from the first logger only (the replayed 5..7 were not sent again); the buffer (5 items:
    # steps 8..12) was full from step 13 on, so 13 and 14 were dropped and counted
    assert history == [(s, float(s)) for s in range(1, 8)] + [(s, s + 0.5) for s in range(8, 13)]
    assert again.dropped == 2
    assert [m.step for m in client.get_metric_history(run_id, "resumed_at_iteration")] == [4]
    assert any("2 dropped (buffer full)" in r.getMessage() for r in caplog.records)


def test_a_stage_run_is_ended_failed_on_an_error_and_killed_on_ctrl_c(tmp_path):
    cfg = load_config(None, [f"storage.root={tmp_path}", "data.shards=https://carol:pw123@example.org/shards"])
    client = MlflowClient(cfg.tracking_uri)
    with tracking.stage_run(cfg, "ok", {}) as ok_id:
        pass
    with pytest.raises(ValueError), tracking.stage_run(cfg, "broken", {}) as failed_id:
        raise ValueError("a bug")
    with pytest.raises(KeyboardInterrupt), tracking.stage_run(cfg, "interrupted", {}) as killed_id:
        raise KeyboardInterrupt
    statuses = [client.get_run(run_id).info.status for run_id in (ok_id, failed_id, killed_id)]
    assert statuses == ["FINISHED", "FAILED", "KILLED"]
    # the config was logged when the run was new, without the URL's credentials
    assert client.get_run(ok_id).data.params["data.shards"] == "https://example.org/shards"
    config_json = client.download_artifacts(ok_id, "config.json", str(tmp_path))
    assert "pw123" not in Path(config_json).read_text()
