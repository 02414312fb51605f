"""The dashboard in a real headless Chromium against real gunicorn instances."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import requests

from tests.browser import chromium, console_errors, require_browser
from tests.support import Instance, healthy, wait_for

pytestmark = pytest.mark.browser

API_KEY = "dashboard-test-key"


@pytest.fixture
def browser() -> Iterator[Any]:
    require_browser()  # first, so a missing browser fails before any instance starts
    with chromium() as driver:
        yield driver


@pytest.fixture
def cluster(browser: Any, instances: Callable[..., Instance]) -> list[Instance]:
    """Two instances that process instantly."""
    return list(healthy(instances(wait=False), instances(wait=False)))


def until(driver: Any, condition: Callable[[], Any], timeout: float = 15, what: str = "") -> Any:
    """Wait for a condition read from the page; on timeout, say what the page showed."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda _: condition())
    except TimeoutException:
        page = driver.find_element("tag name", "body").text
        raise AssertionError(f"timed out waiting for {what}; the page shows:\n{page}") from None


def js(driver: Any, script: str, *args: Any) -> Any:
    return driver.execute_script(script, *args)


def connection_mode(driver: Any) -> str:
    return js(driver, "return document.getElementById('connection').dataset.mode")


def count(driver: Any, status: str) -> str:
    return js(driver, f"return document.getElementById('count-{status}').textContent")


def task_row_status(driver: Any, task_id: int) -> str | None:
    return js(
        driver,
        "const row = document.querySelector(`#tasks-table tr[data-task-id='${arguments[0]}']`);"
        "return row ? row.dataset.status : null;",
        task_id,
    )


def record_texts(driver: Any, element_id: str) -> None:
    """From now on, keep every text the element shows (however briefly) for texts_shown."""
    js(
        driver,
        "const node = document.getElementById(arguments[0]);"
        "window.shownTexts = window.shownTexts || {};"
        "const seen = window.shownTexts[arguments[0]] = [node.textContent];"
        "new MutationObserver(() => seen.push(node.textContent))"
        "  .observe(node, {childList: true, characterData: true, subtree: true});",
        element_id,
    )


def texts_shown(driver: Any, element_id: str) -> list[str]:
    return js(driver, "return window.shownTexts[arguments[0]]", element_id)


def open_dashboard(driver: Any, url: str) -> None:
    driver.get(f"{url}/dashboard/")
    until(driver, lambda: connection_mode(driver) == "live", what="the event stream to open")


def test_page_loads_live_with_both_instances_and_no_console_errors(browser, cluster):
    a, b = cluster
    open_dashboard(browser, a.url)

    until(
        browser,
        lambda: browser.find_element("id", "instances-summary").text.startswith("2 alive"),
        what="both instances in the instances table",
    )
    rows = js(browser, "return [...document.querySelectorAll('#instances-table tbody tr')].length")
    assert rows == 2
    assert count(browser, "pending") == "0"

    for n in range(3):
        response = requests.post(f"{b.url}/tasks/", json={"title": f"api task {n}"}, timeout=10)
        assert response.status_code == 201
    until(browser, lambda: count(browser, "completed") == "3", what="3 completed tasks")
    until(
        browser,
        lambda: all(task_row_status(browser, n) == "completed" for n in (1, 2, 3)),
        what="the table to show the 3 tasks completed",
    )
    assert "last minute: 3 completed" in browser.find_element("id", "throughput-summary").text
    assert console_errors(browser) == []


def test_task_created_from_the_form_appears_and_completes_live(browser, cluster):
    a, _ = cluster
    open_dashboard(browser, a.url)
    js(browser, "window.notReloaded = true")

    title = '<img src=x onerror="window.injected=1"> & "quoted"'
    # Due in a few seconds: the row shows `pending` first, then `completed` on its own.
    due = (datetime.now() + timedelta(seconds=4)).replace(microsecond=0)
    form = browser.find_element("id", "create-form")
    form.find_element("name", "title").send_keys(title)
    form.find_element("name", "description").send_keys("made in a browser")
    priority = form.find_element("name", "priority")
    priority.clear()
    priority.send_keys("5")
    js(
        browser,
        "const input = arguments[0]; input.value = arguments[1];"
        "input.dispatchEvent(new Event('input', {bubbles: true}));",
        form.find_element("name", "scheduled_for"),
        due.strftime("%Y-%m-%dT%H:%M:%S"),
    )
    form.find_element("name", "conversations").send_keys("first line\nsecond line\n")
    form.find_element("css selector", "button[type=submit]").click()

    until(
        browser,
        lambda: "Created task #1" in browser.find_element("id", "create-result").text,
        what="the form to confirm the new task",
    )
    until(browser, lambda: task_row_status(browser, 1) == "pending", what="task 1 pending")
    until(browser, lambda: task_row_status(browser, 1) == "completed", what="task 1 completed")
    assert js(browser, "return window.notReloaded") is True

    # The title is shown as text: nothing of it became markup.
    cell = browser.find_element("css selector", "#tasks-table tr[data-task-id='1'] .title-cell")
    assert cell.text == title
    assert browser.find_elements("css selector", "#tasks-table img") == []
    assert js(browser, "return window.injected") is None

    task = requests.get(f"{a.url}/tasks/1", timeout=10).json()
    assert task["title"] == title
    assert task["priority"] == 5
    assert task["description"] == "made in a browser"
    assert [c["content"] for c in task["conversations"]] == ["first line", "second line"]
    scheduled = datetime.fromisoformat(task["scheduled_for"])
    assert abs(scheduled - due.astimezone()) < timedelta(seconds=1)
    assert console_errors(browser) == []


def test_the_form_shows_invalid_input_readably(browser, cluster):
    a, _ = cluster
    open_dashboard(browser, a.url)
    form = browser.find_element("id", "create-form")
    form.find_element("name", "title").send_keys("   ")
    form.find_element("css selector", "button[type=submit]").click()

    result = until(
        browser,
        lambda: (
            (text := browser.find_element("id", "create-result").text).startswith("422") and text
        ),
        what="the form to show the 422",
    )
    assert "Unprocessable" in result
    title_input = form.find_element("name", "title")
    assert title_input.get_attribute("aria-invalid") == "true"
    assert browser.find_element("id", "create-title-input-error").text
    assert requests.get(f"{a.url}/tasks/", timeout=10).json() == []


def test_a_killed_instance_is_shown_dead(browser, instances):
    # A 3 s lease makes the instances beat every second, so death shows within seconds.
    a, b = healthy(instances(wait=False, LEASE_SECONDS=3), instances(wait=False, LEASE_SECONDS=3))
    open_dashboard(browser, a.url)
    b_id = b.status()["instance_id"]

    def state_of(instance_id: str) -> str | None:
        return js(
            browser,
            "const rows = document.querySelectorAll('#instances-table tr[data-instance-id]');"
            "const row = [...rows].find((r) => r.dataset.instanceId === arguments[0]);"
            "return row ? row.dataset.state : null;",
            instance_id,
        )

    until(browser, lambda: state_of(b_id) == "idle", what="instance B idle")
    b.kill()
    until(browser, lambda: state_of(b_id) == "dead", what="instance B shown dead")
    assert state_of(a.status()["instance_id"]) == "idle"
    assert browser.find_element("id", "instances-summary").text.startswith("1 alive")


def test_without_the_event_stream_the_page_polls(browser, instances):
    a = instances(MAX_EVENT_STREAMS=0)  # every /events request is refused with a 503
    browser.get(f"{a.url}/dashboard/")
    until(browser, lambda: connection_mode(browser) == "polling", what="the page to poll")
    js(browser, "window.notReloaded = true")

    response = requests.post(f"{a.url}/tasks/", json={"title": "seen by polling"}, timeout=10)
    assert response.status_code == 201
    until(browser, lambda: count(browser, "completed") == "1", what="the completed count")
    until(browser, lambda: task_row_status(browser, 1) == "completed", what="task 1 completed")
    assert js(browser, "return window.notReloaded") is True
    assert "polling every 2.5 s" in browser.find_element("id", "connection").text


def test_retry_a_failed_task_from_its_page(browser, instances):
    env = {"TASK_PROCESSOR": "tests.processors:fail_when_titled_fail", "MAX_ATTEMPTS": 1}
    a, _ = healthy(instances(wait=False, **env), instances(wait=False, **env))
    response = requests.post(f"{a.url}/tasks/", json={"title": "fail on purpose"}, timeout=10)
    assert response.status_code == 201
    wait_for(
        lambda: requests.get(f"{a.url}/tasks/1", timeout=5).json()["status"] == "failed",
        what="task 1 to fail",
    )

    browser.get(f"{a.url}/dashboard/tasks/1")
    until(browser, lambda: connection_mode(browser) == "live", what="the event stream to open")
    until(browser, lambda: js(browser, "return document.body.dataset.taskStatus") == "failed")
    js(browser, "window.notReloaded = true")
    assert "fail on purpose" in browser.find_element("id", "task-title").text
    # Read in one go: a refresh may render the table again between two WebDriver calls.
    errors = js(
        browser,
        "return [...document.querySelectorAll('#errors-table tbody tr')]"
        ".map((row) => row.textContent)",
    )
    assert len(errors) == 1
    assert "is titled 'fail on purpose'" in errors[0]
    assert not browser.find_element("id", "retry-button").get_property("disabled")
    assert browser.find_element("id", "cancel-button").get_property("disabled")

    # The task fails again within milliseconds: every text the result line shows is recorded.
    record_texts(browser, "action-result")
    browser.find_element("id", "retry-button").click()
    until(
        browser,
        lambda: "Sent back to the queue." in texts_shown(browser, "action-result"),
        what="the retry to be confirmed",
    )
    # It runs again, fails again, and the second failure shows up without a reload.
    until(
        browser,
        lambda: len(browser.find_elements("css selector", "#errors-table tbody tr")) == 2,
        what="a second entry in the error history",
    )
    until(browser, lambda: js(browser, "return document.body.dataset.taskStatus") == "failed")
    # "Sent back to the queue" was true while it was pending: not now that it failed again.
    until(
        browser,
        lambda: browser.find_element("id", "action-result").text == "",
        what="the confirmation to go once the task left the state it described",
    )
    assert js(browser, "return window.notReloaded") is True
    assert console_errors(browser) == []

    # A refused action shows the API's problem+json, readably (the button is forced on).
    js(browser, "document.getElementById('cancel-button').disabled = false")
    browser.find_element("id", "cancel-button").click()
    message = until(
        browser,
        lambda: (
            (text := browser.find_element("id", "action-result").text).startswith("409") and text
        ),
        what="the 409 to be shown",
    )
    assert "Conflict" in message


def test_with_api_keys_the_page_asks_for_a_key_and_works_with_it(browser, instances):
    a = instances(API_KEYS=API_KEY)

    browser.get(f"{a.url}/dashboard/")
    until(
        browser,
        lambda: "An API key is needed" in browser.find_element("tag name", "body").text,
        what="the key prompt",
    )
    key_input = browser.find_element("id", "key-input")
    label = browser.find_element("css selector", "label[for='key-input']")
    assert label.text == "API key"

    # The page's assets and the event stream cannot send a header: they carry `?api_key=`.
    page = requests.get(f"{a.url}/dashboard/", params={"api_key": API_KEY}, timeout=5)
    assert page.status_code == 200
    with requests.get(
        f"{a.url}/events", params={"api_key": API_KEY}, stream=True, timeout=5
    ) as stream:
        assert stream.status_code == 200

    key_input.send_keys("not-the-key")
    key_input.submit()
    until(
        browser,
        lambda: "not accepted" in browser.find_element("tag name", "body").text,
        what="the wrong key to be refused",
    )
    console_errors(browser)  # the refusals were logged as failed loads: start afresh

    key_input = browser.find_element("id", "key-input")
    key_input.clear()
    key_input.send_keys(API_KEY)
    key_input.submit()
    until(browser, lambda: connection_mode(browser) == "live", what="the event stream to open")
    assert "api_key" not in browser.current_url
    until(browser, lambda: count(browser, "pending") == "0", what="the queue counts")

    browser.find_element("name", "title").send_keys("made with a key")
    browser.find_element("css selector", "#create-form button[type=submit]").click()
    until(browser, lambda: task_row_status(browser, 1) == "completed", what="task 1 completed")
    assert console_errors(browser) == []


def test_a_tasks_page_shows_its_result_and_its_conversations_results(browser, instances):
    a = instances(TASK_PROCESSOR="examples.sentiment:process")
    body = {
        "title": "feedback",
        "conversations": [{"content": "<b>I love it</b>, wonderful!"}, {"content": "Awful."}],
    }
    task = requests.post(f"{a.url}/tasks/", json=body, timeout=10).json()
    wait_for(
        lambda: (
            requests.get(f"{a.url}/tasks/{task['id']}", timeout=5).json()["status"] == "completed"
        ),
        what="the task to complete",
    )
    browser.get(f"{a.url}/dashboard/tasks/{task['id']}")
    until(browser, lambda: js(browser, "return document.body.dataset.taskStatus") == "completed")
    result = browser.find_element("id", "task-result").text
    assert '"positive": 1' in result and '"negative": 1' in result, result
    shown = [e.text for e in browser.find_elements("css selector", ".conversation-result")]
    assert len(shown) == 2 and '"sentiment":"positive"' in shown[0], shown
    assert '"sentiment":"negative"' in shown[1], shown
    # Content and results are text, never markup.
    assert browser.find_elements("css selector", "#conversations b") == []
    assert "<b>I love it</b>" in browser.find_element("id", "conversations").text
    assert console_errors(browser) == []


LIVE_PROCESSOR = "tests.processors.live:emit_slowly"


def task_status(driver: Any) -> str | None:
    return js(driver, "return document.body.dataset.taskStatus || null")


def live_outputs(driver: Any) -> list[str | None]:
    """Each conversation's live output on the page (its current attempt's), in list order."""
    return js(
        driver,
        "return [...document.querySelectorAll('#conversations > li')].map((li) => {"
        "  const block = li.querySelector('.live-output-text:not(.earlier)');"
        "  return block ? block.textContent : null; });",
    )


def progress_shown(driver: Any) -> dict[str, Any]:
    return js(
        driver,
        "const box = document.getElementById('task-progress');"
        "const count = box.querySelector('.progress-count');"
        "const bar = box.querySelector('[role=progressbar]');"
        "const message = box.querySelector('.progress-message');"
        "return {text: box.textContent, count: count ? count.textContent : null,"
        "  now: bar ? bar.getAttribute('aria-valuenow') : null,"
        "  max: bar ? bar.getAttribute('aria-valuemax') : null,"
        "  message: message ? message.textContent : null};",
    )


def field(driver: Any, name: str) -> str:
    return js(
        driver,
        "const dt = [...document.querySelectorAll('#task-fields dt')]"
        "  .find((d) => d.textContent === arguments[0]);"
        "return dt ? dt.nextElementSibling.textContent : null;",
        name,
    )


def test_a_running_tasks_page_shows_its_progress_and_live_output(browser, instances):
    # A serves the page and its event stream and processes nothing; B, started once the page
    # watches, runs the processor: every chunk crosses instances through PostgreSQL.
    a = instances(WORKER_ENABLED=0)
    contents = ["<b>alpha</b> & co", "beta"]
    body = {"title": "live", "conversations": [{"content": c} for c in contents]}
    task = requests.post(f"{a.url}/tasks/", json=body, timeout=10).json()
    ids = [c["id"] for c in task["conversations"]]

    browser.get(f"{a.url}/dashboard/tasks/{task['id']}")
    until(browser, lambda: connection_mode(browser) == "live", what="the event stream to open")
    until(browser, lambda: task_status(browser) == "pending", what="the task pending")
    js(browser, "window.notReloaded = true")
    assert progress_shown(browser)["text"] == "No progress reported."
    assert field(browser, "Timeout") == "default"
    assert field(browser, "Deferrals") == "0"
    assert live_outputs(browser) == [None, None]
    note = browser.find_element("id", "live-output-note").text
    assert "not stored" in note and "only while this page watches" in note

    instances(TASK_PROCESSOR=LIVE_PROCESSOR, TEST_PROCESSOR_SECONDS=0.3)

    # While it runs: part of the first conversation's output, and a progress short of 10.
    def running_with_output() -> bool:
        first = live_outputs(browser)[0]
        return task_status(browser) == "processing" and first is not None and "#1; " in first

    until(browser, running_with_output, what="live output while the task is processing")
    seen = progress_shown(browser)
    assert seen["max"] == "10" and seen["count"] == f"{seen['now']} / 10", seen
    assert 1 <= int(seen["now"]) < 10, seen
    assert seen["message"].startswith(f"conversation {ids[0]}: chunk "), seen
    partial = live_outputs(browser)[0]
    expected_first = "".join(f"{contents[0]} #{k}; " for k in range(5))
    assert expected_first.startswith(partial) and partial != expected_first, partial
    # A processing task can be cancelled now.
    assert not browser.find_element("id", "cancel-button").get_property("disabled")
    assert browser.find_element("id", "retry-button").get_property("disabled")

    until(browser, lambda: task_status(browser) == "completed", what="the task completed")
    # Every chunk, in order, as text: the content's markup stayed text.
    assert live_outputs(browser) == [
        expected_first,
        "".join(f"beta #{k}; " for k in range(5)),
    ]
    assert browser.find_elements("css selector", "#conversations b") == []
    until(
        browser,
        lambda: progress_shown(browser)["count"] == "10 / 10",
        what="the last progress report",
    )
    assert progress_shown(browser)["message"] == f"conversation {ids[1]}: chunk 5"
    result = browser.find_element("id", "task-result").text
    assert '"chunks": 10' in result and '"conversations": 2' in result, result
    shown = [e.text for e in browser.find_elements("css selector", ".conversation-result")]
    assert shown == ['{"chunks":5}', '{"chunks":5}'], shown
    assert js(browser, "return window.notReloaded") is True
    assert console_errors(browser) == []

    # Live output is not stored: a fresh page has the progress (stored) but no output.
    browser.refresh()
    until(browser, lambda: task_status(browser) == "completed", what="the reloaded page")
    until(browser, lambda: progress_shown(browser)["count"] == "10 / 10", what="the progress")
    assert live_outputs(browser) == [None, None]
    assert browser.find_elements("css selector", ".live-output") == []


def test_a_processing_task_is_cancelled_from_its_page(browser, instances):
    a = instances(TASK_PROCESSOR=LIVE_PROCESSOR, TEST_PROCESSOR_SECONDS=1)
    # Scheduled a little later, so the page watches before it starts.
    due = (datetime.now().astimezone() + timedelta(seconds=2)).isoformat()
    body = {"title": "to cancel", "scheduled_for": due, "conversations": [{"content": "slow"}]}
    task = requests.post(f"{a.url}/tasks/", json=body, timeout=10).json()

    browser.get(f"{a.url}/dashboard/tasks/{task['id']}")
    until(browser, lambda: connection_mode(browser) == "live", what="the event stream to open")
    until(
        browser,
        lambda: task_status(browser) == "processing" and live_outputs(browser)[0] == "slow #0; ",
        timeout=20,
        what="the first chunk of a processing task",
    )
    assert "Cancel stops its processor" in browser.find_element("id", "action-hint").text
    browser.find_element("id", "cancel-button").click()
    until(
        browser,
        lambda: browser.find_element("id", "action-result").text == "Cancelled.",
        what="the cancel to be confirmed",
    )
    until(browser, lambda: task_status(browser) == "cancelled", what="the task cancelled")
    assert not browser.find_element("id", "retry-button").get_property("disabled")

    # The processor stopped: no more output, and nothing of its run was recorded.
    time.sleep(2.5)
    assert live_outputs(browser)[0] in ("slow #0; ", "slow #0; slow #1; ")
    stored = requests.get(f"{a.url}/tasks/{task['id']}", timeout=10).json()
    assert stored["status"] == "cancelled" and stored["result"] is None, stored
    assert stored["conversations"][0]["status"] == "active", stored
    assert console_errors(browser) == []


def queue_row(driver: Any, name: str) -> dict[str, str] | None:
    return js(
        driver,
        "const row = document.querySelector(`#queues-table tr[data-queue='${arguments[0]}']`);"
        "return row ? {state: row.querySelector('.queue-state').textContent,"
        " cells: [...row.cells].map((c) => c.textContent)} : null;",
        name,
    )


def test_a_queue_is_paused_and_resumed_from_the_overview(browser, instances):
    a = instances(WORKER_QUEUES="default:1,llm:1")
    assert requests.post(f"{a.url}/queues/llm/pause", timeout=10).status_code == 200
    limits = {"key_concurrency_limit": 2, "key_rate_limit": {"limit": 60, "period_seconds": 60}}
    assert requests.put(f"{a.url}/queues/llm", json=limits, timeout=10).status_code == 200
    for n in range(3):
        body = {"title": f"llm {n}", "queue": "llm", "concurrency_key": "key-a"}
        assert requests.post(f"{a.url}/tasks/", json=body, timeout=10).status_code == 201
    open_dashboard(browser, a.url)
    row = until(browser, lambda: (r := queue_row(browser, "llm")) and r["state"] == "paused" and r)
    assert row["cells"][1] == "3"  # pending
    assert "2 running per key" in row["cells"][3] and "per key: 60 per 60s" in row["cells"][3]

    browser.find_element("css selector", "button.queue-action[data-queue='llm']").click()
    until(browser, lambda: "Resumed llm" in browser.find_element("id", "queues-result").text)
    assert requests.get(f"{a.url}/queues/llm", timeout=10).json()["paused"] is False
    wait_for(
        lambda: requests.get(f"{a.url}/queues/llm", timeout=5).json()["counts"]["completed"] == 3,
        what="the resumed queue to drain",
    )
    until(browser, lambda: (r := queue_row(browser, "llm")) and r["cells"][1] == "0")
    browser.find_element("css selector", "button.queue-action[data-queue='llm']").click()
    until(browser, lambda: "Paused llm" in browser.find_element("id", "queues-result").text)
    assert requests.get(f"{a.url}/queues/llm", timeout=10).json()["paused"] is True
    assert console_errors(browser) == []


# -- rough edges seen in a browser (issue 14) --------------------------------------------------


def instance_shown(driver: Any, instance_id: str) -> dict[str, str] | None:
    """An instance's row: its state and its current-task cell."""
    return js(
        driver,
        "const rows = document.querySelectorAll('#instances-table tr[data-instance-id]');"
        "const row = [...rows].find((r) => r.dataset.instanceId === arguments[0]);"
        "return row ? {state: row.dataset.state, current: row.cells[3].textContent} : null;",
        instance_id,
    )


def test_the_instances_panel_shows_who_works_within_a_second(browser, instances):
    # 3 s tasks and the default lease, so heartbeats come every 5 s: the panel can't wait for
    # them. Two rounds, so that no heartbeat can happen to come just in time for every check.
    env = {"PROCESSING_MIN_SECONDS": 3, "PROCESSING_MAX_SECONDS": 3}
    a, b = healthy(instances(wait=False, **env), instances(wait=False, **env))
    both = [a.status()["instance_id"], b.status()["instance_id"]]
    open_dashboard(browser, a.url)
    until(
        browser,
        lambda: all((instance_shown(browser, i) or {}).get("state") == "idle" for i in both),
        what="both instances idle",
    )
    summary = browser.find_element("id", "instances-summary")

    def run_one(title: str) -> None:
        task = requests.post(f"{b.url}/tasks/", json={"title": title}, timeout=10).json()
        url = f"{a.url}/tasks/{task['id']}"

        def runner() -> str | None:
            shown = requests.get(url, timeout=5).json()
            return shown["status"] == "processing" and shown["processing_instance_id"]

        runner_id = wait_for(runner, interval=0.02, what=f"task {task['id']} to start")
        shown = until(
            browser,
            lambda: (s := instance_shown(browser, runner_id)) and s["state"] == "working" and s,
            timeout=1.5,
            what="its instance shown working within about a second",
        )
        assert shown["current"] == f"#{task['id']}"
        assert summary.text == "2 alive, 1 working"
        wait_for(
            lambda: requests.get(url, timeout=5).json()["status"] == "completed",
            interval=0.02,
            what=f"task {task['id']} to complete",
        )
        until(
            browser,
            lambda: instance_shown(browser, runner_id)["state"] == "idle",
            timeout=1.5,
            what="its instance shown idle again within about a second",
        )
        assert summary.text == "2 alive, 0 working"

    run_one("3 s, first")
    run_one("3 s, second")
    assert console_errors(browser) == []


def assert_not_found_page(driver: Any, task_id: int) -> None:
    """The page says the task is not found (404), offers nothing to do and waits for nothing."""
    text = driver.find_element("tag name", "body").text
    assert f"Task #{task_id} not found" in text and "404" in text, text
    assert "Loading" not in text, text
    assert driver.find_elements("css selector", "#retry-button, #cancel-button") == []
    assert driver.find_elements("css selector", "#conversations, #errors-table") == []
    assert driver.title == f"Task {task_id} not found · taskapp"
    assert connection_mode(driver) == "closed"


def not_found_loads(errors: list[dict[str, Any]], task_id: int) -> list[dict[str, Any]]:
    """The console errors that are not the expected 404 of the task's page or its API read."""
    return [
        e for e in errors if not (f"/tasks/{task_id} " in e["message"] and "404" in e["message"])
    ]


def test_a_missing_tasks_page_is_a_404_that_says_so_with_nothing_to_do(browser, instances):
    a = instances(WORKER_ENABLED=0)  # its task stays pending: only the test changes it
    assert requests.get(f"{a.url}/dashboard/tasks/99", timeout=5).status_code == 404
    browser.get(f"{a.url}/dashboard/tasks/99")
    until(browser, lambda: "not found" in browser.title, what="the not-found page")
    assert_not_found_page(browser, 99)
    assert "never created, or it has been deleted" in browser.find_element("id", "not-found").text
    assert not_found_loads(console_errors(browser), 99) == []

    # A task deleted while its page is open: the page becomes the same, without a reload.
    task = requests.post(f"{a.url}/tasks/", json={"title": "to delete"}, timeout=10).json()
    assert requests.get(f"{a.url}/dashboard/tasks/{task['id']}", timeout=5).status_code == 200
    browser.get(f"{a.url}/dashboard/tasks/{task['id']}")
    until(browser, lambda: connection_mode(browser) == "live", what="the event stream to open")
    until(browser, lambda: task_status(browser) == "pending", what="the task pending")
    js(browser, "window.notReloaded = true")
    assert requests.delete(f"{a.url}/tasks/{task['id']}", timeout=10).status_code == 204
    until(browser, lambda: task_status(browser) == "not-found", what="the page to see it gone")
    assert_not_found_page(browser, task["id"])
    assert "deleted while this page showed it" in browser.find_element("id", "not-found").text
    assert js(browser, "return window.notReloaded") is True
    assert not_found_loads(console_errors(browser), task["id"]) == []


BROWSER_ZONE = "Asia/Kolkata"  # +05:30 all year: no daylight saving to reckon with


def times_shown(driver: Any) -> list[dict[str, str]]:
    return js(
        driver,
        "return [...document.querySelectorAll('time')]"
        "  .map((t) => ({text: t.textContent, datetime: t.getAttribute('datetime')}));",
    )


def test_every_time_is_shown_one_way_with_its_date_and_zone(instances):
    require_browser()
    a = instances(TASK_PROCESSOR="tests.processors:fail_when_titled_fail", MAX_ATTEMPTS=1)
    created = [
        requests.post(f"{a.url}/tasks/", json=body, timeout=10).json()
        for body in [
            {"title": "fail once", "conversations": [{"content": "c"}]},
            {"title": "done", "conversations": [{"content": "c"}]},
            {"title": "later", "scheduled_for": "2030-06-01T12:00:00+00:00"},
        ]
    ]
    failed, done, later = (task["id"] for task in created)
    for task_id, status in ((failed, "failed"), (done, "completed")):
        wait_for(
            lambda t=task_id, s=status: (
                requests.get(f"{a.url}/tasks/{t}", timeout=5).json()["status"] == s
            ),
            what=f"task {task_id} {status}",
        )
    zone = ZoneInfo(BROWSER_ZONE)

    def expected(iso: str) -> str:
        return datetime.fromisoformat(iso).astimezone(zone).strftime("%Y-%m-%d %H:%M:%S GMT+5:30")

    with chromium(timezone=BROWSER_ZONE) as driver:
        driver.get(f"{a.url}/dashboard/")
        until(driver, lambda: task_row_status(driver, done) == "completed", what="the tasks")
        until(driver, lambda: len(times_shown(driver)) >= 5, what="the tasks' and instance's times")
        pages = {"overview": times_shown(driver)}
        assert "optional, GMT+5:30" in driver.find_element("id", "create-scheduled-zone").text
        for task_id in (failed, later):
            driver.get(f"{a.url}/dashboard/tasks/{task_id}")
            until(driver, lambda: task_status(driver) in ("failed", "pending"), what="the task")
            pages[f"task {task_id}"] = times_shown(driver)
        # 12:00 UTC, once shown as "6/1/30, 12:00:00" or as a bare "20:45:35".
        assert field(driver, "Not before") == "2030-06-01 17:30:00 GMT+5:30"
        assert console_errors(driver) == []
    for page, shown in pages.items():
        assert shown, page
        for time_shown in shown:
            assert time_shown["text"] == expected(time_shown["datetime"]), (page, time_shown)


def test_a_success_message_goes_once_the_state_it_describes_changes(browser, instances):
    a = instances()
    # A queue is listed once it holds tasks: task 1.
    assert requests.post(f"{a.url}/tasks/", json={"title": "first"}, timeout=10).ok
    open_dashboard(browser, a.url)
    until(browser, lambda: (queue_row(browser, "default") or {}).get("state") == "running")
    browser.find_element("css selector", "button.queue-action[data-queue='default']").click()
    result = browser.find_element("id", "queues-result")
    until(browser, lambda: result.text == "Paused default on every instance.")
    until(browser, lambda: queue_row(browser, "default")["state"] == "paused")
    # Someone else resumes it: once the page sees that, "Paused" is no longer true.
    assert requests.post(f"{a.url}/queues/default/resume", timeout=10).status_code == 200
    until(browser, lambda: queue_row(browser, "default")["state"] == "running")
    assert result.text == ""

    # "Created task #2." is about the input just sent: new input makes it old news.
    form = browser.find_element("id", "create-form")
    form.find_element("name", "title").send_keys("second")
    form.find_element("css selector", "button[type=submit]").click()
    created = browser.find_element("id", "create-result")
    until(browser, lambda: created.text == "Created task #2.")
    form.find_element("name", "title").send_keys("third")
    until(browser, lambda: created.text == "")
    assert console_errors(browser) == []


def tasks_shown(driver: Any) -> list[int]:
    return js(
        driver,
        "return [...document.querySelectorAll('#tasks-table tr[data-task-id]')]"
        "  .map((row) => Number(row.dataset.taskId));",
    )


def address(driver: Any) -> str:
    return js(driver, "return location.search")


def test_the_filter_and_the_page_are_kept_in_the_address(browser, instances):
    from selenium.webdriver.support.ui import Select

    a = instances(TASK_PROCESSOR="tests.processors:fail_when_titled_fail", MAX_ATTEMPTS=1)
    # 25 completed and 3 failed (1, 11, 21): two pages of 20 of completed ones.
    for n in range(28):
        title = "fail" if n % 10 == 0 else f"task {n + 1}"
        assert requests.post(f"{a.url}/tasks/", json={"title": title}, timeout=10).ok
    wait_for(
        lambda: a.status()["queue"]["completed"] == 25,
        what="the tasks to be done",
    )
    newest_first = list(range(28, 0, -1))
    completed = [n for n in newest_first if n not in (1, 11, 21)]

    def shows(search: str, ids: list[int], status: str = "") -> Callable[[], bool]:
        def check() -> bool:
            select = browser.find_element("id", "status-filter").get_property("value")
            return address(browser) == search and select == status and tasks_shown(browser) == ids

        return check

    open_dashboard(browser, a.url)
    until(browser, shows("", newest_first[:20]), what="the newest 20")
    Select(browser.find_element("id", "status-filter")).select_by_value("completed")
    until(browser, shows("?status=completed", completed[:20], "completed"), what="the filter")
    browser.find_element("id", "tasks-older").click()
    page_2 = shows("?status=completed&page=2", completed[20:], "completed")
    until(browser, page_2, what="page 2 of the completed ones")

    browser.refresh()
    until(browser, page_2, what="the reload to show the same page")
    browser.back()
    until(browser, shows("?status=completed", completed[:20], "completed"), what="back: page 1")
    browser.back()
    until(browser, shows("", newest_first[:20]), what="back: no filter")
    browser.forward()
    until(browser, shows("?status=completed", completed[:20], "completed"), what="forward")

    # An address typed or bookmarked: shown as it says; what it can't mean, as the default.
    browser.get(f"{a.url}/dashboard/?status=failed")
    until(browser, shows("?status=failed", [21, 11, 1], "failed"), what="the failed ones")
    browser.get(f"{a.url}/dashboard/?status=nonsense&page=-3")
    until(browser, lambda: tasks_shown(browser) == newest_first[:20], what="the default view")
    assert browser.find_element("id", "status-filter").get_property("value") == ""
    # A page past the end (fewer tasks since): the last one, and the address says so.
    browser.get(f"{a.url}/dashboard/?status=failed&page=9")
    until(browser, shows("?status=failed", [21, 11, 1], "failed"), what="the last page")
    assert console_errors(browser) == []
