"""/metrics: valid Prometheus text, right when gunicorn runs several worker processes."""

from __future__ import annotations

import requests
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from taskapp import metrics
from tests.support import create_task, wait_for


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    response = requests.get(f"{url}/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def total(samples: dict, name: str, **labels: str) -> float:
    return sum(
        value
        for (sample, sample_labels), value in samples.items()
        if sample == name and all((k, v) in sample_labels for k, v in labels.items())
    )


def test_counters_add_up_across_two_gunicorn_workers(instances, db_conn):
    instance = instances(WEB_CONCURRENCY=2, WORKER_CONCURRENCY=2)
    for n in range(20):
        create_task(instance.url, f"metric {n}", conversations=0)

    def all_done() -> bool:
        (n,) = db_conn.execute("SELECT count(*) FROM tasks WHERE status = 'completed'").fetchone()
        return n == 20

    wait_for(all_done, timeout=20)

    def worker_pids() -> set[int]:
        return {pid for (pid,) in db_conn.execute("SELECT DISTINCT pid FROM instances")}

    wait_for(lambda: len(worker_pids()) == 2, what="both worker processes to run an instance")
    samples = wait_for(
        lambda: (
            (s := scrape(instance.url)) and total(s, "taskapp_tasks_completed_total") == 20 and s
        ),
        timeout=10,
        what="completed counter to reach 20",
    )
    assert total(samples, "taskapp_tasks_claimed_total") == 20
    assert total(samples, "taskapp_queue_tasks", status="completed") == 20
    assert total(samples, "taskapp_queue_tasks", status="pending") == 0
    assert total(samples, "taskapp_task_processing_seconds_count", outcome="completed") == 20
    posts = total(
        samples, "taskapp_http_requests_total", method="POST", endpoint="/tasks/", status="201"
    )
    assert posts == 20
    assert ("taskapp_queue_oldest_pending_age_seconds", ()) in samples


def test_failures_and_retries_are_counted(instances, db_conn):
    instance = instances(
        TASK_PROCESSOR="tests.processors:always_fail", MAX_ATTEMPTS=2, RETRY_BASE_SECONDS=0
    )
    task = create_task(instance.url, "doomed", conversations=0)

    def failed() -> bool:
        (status,) = db_conn.execute(
            "SELECT status FROM tasks WHERE id = %s", (task["id"],)
        ).fetchone()
        return status == "failed"

    wait_for(failed, timeout=10)
    samples = scrape(instance.url)
    assert total(samples, "taskapp_tasks_retried_total") == 1
    assert total(samples, "taskapp_tasks_failed_total") == 1
    assert total(samples, "taskapp_queue_tasks", status="failed") == 1


def test_observe_many_counts_as_observe_does():
    """metrics.observe_many writes straight to the histogram's buckets: the same exposition as
    one observe() per amount, bucket edges and the +Inf bucket included."""
    amounts = [0.0, 0.004, 0.01, 0.0100001, 0.05, 0.3, 1, 7.5, 299.9, 300, 301, 5000, 0.01]
    texts = []
    for fill in ("observe", "observe_many"):
        registry = CollectorRegistry()
        histogram = Histogram(
            "taskapp_test_seconds",
            "test",
            ["outcome"],
            buckets=(0.01, 0.05, 1, 300),
            registry=registry,
        ).labels("completed")
        if fill == "observe":
            for amount in amounts:
                histogram.observe(amount)
        else:
            metrics.observe_many(histogram, amounts)
        texts.append(
            "\n".join(
                line
                for line in generate_latest(registry).decode().splitlines()
                if "_created" not in line
            )
        )
    assert texts[0] == texts[1]
    assert 'taskapp_test_seconds_bucket{le="0.01",outcome="completed"} 4.0' in texts[1]
    assert 'taskapp_test_seconds_count{outcome="completed"} 13.0' in texts[1]
