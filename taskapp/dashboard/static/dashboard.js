// taskapp dashboard: reads the API from the browser and keeps the page live.
//
// Live updates come from EventSource("/events"); while that stream is down the page polls
// /status instead. Every text that comes from the API is put in the page as text (textContent,
// createTextNode), never as HTML.
"use strict";

(function () {
  // The states, event types and which states each action accepts: rendered by the server
  // from the service's own definitions (taskapp.states, taskapp.events).
  const VOCABULARY = JSON.parse(document.getElementById("vocabulary").textContent);
  const STATUSES = VOCABULARY.statuses;
  const EVENT_TYPES = VOCABULARY.event_types;
  const KEY_STORAGE = "taskapp.apiKey";
  const KEY_PARAM = "api_key";
  const POLL_MS = 2500; // while the event stream is down
  const TASKS_PAGE_SIZE = 20;

  const body = document.body;
  const keyInLinks = body.dataset.keyInLinks === "true";
  const heartbeatSeconds = Number(body.dataset.heartbeatSeconds) || 5;
  // An instance that missed two beats (and a second of slack) is shown as dead.
  const deadAfterSeconds = 2 * heartbeatSeconds + 1;
  // /status stops listing an instance once it stopped cleanly, or 3 beats after its last one:
  // one that leaves the list with a fresher heartbeat than this was stopped, not lost.
  const stoppedBeforeSeconds = 2.5 * heartbeatSeconds;
  // Heartbeats are not events: read /status once a beat anyway (1 to 5 s).
  const STATUS_REFRESH_MS = Math.min(5000, Math.max(1000, heartbeatSeconds * 1000));

  // ---------------------------------------------------------------- API key

  /** Take `?api_key=` (or `?key=`) into session storage and out of the address bar. */
  function takeKeyFromUrl() {
    const params = new URLSearchParams(location.search);
    const key = params.get(KEY_PARAM) || params.get("key");
    if (!key) return;
    sessionStorage.setItem(KEY_STORAGE, key);
    params.delete(KEY_PARAM);
    params.delete("key");
    const rest = params.toString();
    history.replaceState(null, "", location.pathname + (rest ? "?" + rest : "") + location.hash);
  }

  function apiKey() {
    return sessionStorage.getItem(KEY_STORAGE);
  }

  /** A URL with the key as a query parameter, for what cannot send headers. */
  function withKey(url) {
    const key = apiKey();
    if (!key) return url;
    const separator = url.includes("?") ? "&" : "?";
    return url + separator + KEY_PARAM + "=" + encodeURIComponent(key);
  }

  /** The href of a dashboard page: it carries the key when the pages themselves need one. */
  function pageHref(path) {
    return keyInLinks ? withKey(path) : path;
  }

  function showKeyPanel(reason) {
    const panel = document.getElementById("key-panel");
    if (reason) document.getElementById("key-panel-reason").textContent = reason;
    panel.hidden = false;
    document.getElementById("main").hidden = true;
    document.getElementById("key-input").focus();
  }

  function setUpKeyControls() {
    document.getElementById("key-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const key = document.getElementById("key-input").value.trim();
      if (!key) return;
      sessionStorage.setItem(KEY_STORAGE, key);
      location.assign(pageHref(location.pathname));
    });
    const forget = document.getElementById("forget-key");
    if (forget) {
      forget.hidden = !apiKey();
      forget.addEventListener("click", () => {
        sessionStorage.removeItem(KEY_STORAGE);
        location.assign(location.pathname);
      });
    }
    for (const link of document.querySelectorAll("a[data-page-link]")) {
      link.href = pageHref(link.getAttribute("href"));
    }
  }

  // ---------------------------------------------------------------- API calls

  class ApiError extends Error {
    constructor(status, problem) {
      super(describeProblem(status, problem));
      this.status = status;
      this.problem = problem;
    }
  }

  /** "409 Conflict: Task 3 is processing." plus one line per invalid field. */
  function describeProblem(status, problem) {
    if (!problem) return status ? `HTTP ${status}` : "The service could not be reached.";
    const head = `${problem.status || status} ${problem.title || ""}`.trim();
    let text = problem.detail ? `${head}: ${problem.detail}` : head;
    if (problem.errors) {
      for (const [field, messages] of Object.entries(problem.errors)) {
        text += `\n${field}: ${[].concat(messages).join(" ")}`;
      }
    }
    return text;
  }

  async function api(path, { method = "GET", json, headers = {} } = {}) {
    const request = { method, headers: { Accept: "application/json", ...headers } };
    const key = apiKey();
    if (key) request.headers["X-API-Key"] = key;
    if (json !== undefined) {
      request.headers["Content-Type"] = "application/json";
      request.body = JSON.stringify(json);
    }
    let response;
    try {
      response = await fetch(path, request);
    } catch (error) {
      throw new ApiError(0, null);
    }
    if (response.status === 401) {
      showKeyPanel(
        key
          ? "The API key this tab holds was not accepted. Enter another one."
          : "This taskapp requires an API key. Enter one of the keys from its API_KEYS setting.",
      );
    }
    if (!response.ok) {
      let problem = null;
      try {
        problem = await response.json();
      } catch (error) {
        problem = { status: response.status, title: response.statusText };
      }
      throw new ApiError(response.status, problem);
    }
    const type = response.headers.get("Content-Type") || "";
    let data = null;
    if (type.includes("json")) data = await response.json();
    else if (response.status !== 204) data = await response.text();
    noteServerClock(response);
    return { data, response };
  }

  // The server's clock, so that its timestamps and the browser's "now" line up.
  let serverOffsetMs = 0;

  function noteServerClock(response) {
    const date = Date.parse(response.headers.get("Date") || "");
    if (Number.isNaN(date)) return;
    const offset = date - Date.now();
    // The Date header has whole seconds: only a real skew is worth correcting.
    serverOffsetMs = Math.abs(offset) > 2000 ? offset : 0;
  }

  function serverNow() {
    return Date.now() + serverOffsetMs;
  }

  const notice = document.getElementById("notice");

  function showNotice(text) {
    notice.textContent = text;
    notice.hidden = !text;
  }

  /** A form's or an action's result line: its text, shown as "ok", "error" or neither (null). */
  function showResult(node, text, kind) {
    node.className = kind ? `form-result ${kind}` : "form-result";
    node.textContent = text;
  }

  // ---------------------------------------------------------------- helpers

  /** Build an element: el("a", {href: "/x", className: "y"}, "text", child, ...). */
  function el(tag, props = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(props)) {
      if (value === undefined || value === null || value === false) continue;
      if (name === "className") node.className = value;
      else if (name === "dataset") Object.assign(node.dataset, value);
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  /** Call fn at most once per `delay` ms, never two at a time, and once more if asked meanwhile. */
  function coalesce(fn, delay) {
    let timer = null;
    let running = false;
    let again = false;
    async function run() {
      timer = null;
      if (running) {
        again = true;
        return;
      }
      running = true;
      try {
        await fn();
      } catch (error) {
        reportError(error);
      } finally {
        running = false;
        if (again) {
          again = false;
          schedule();
        }
      }
    }
    function schedule() {
      if (timer === null) timer = setTimeout(run, delay);
    }
    schedule.now = () => {
      clearTimeout(timer);
      run();
    };
    return schedule;
  }

  function reportError(error) {
    if (error instanceof ApiError && error.status === 401) return; // the key panel says it
    showNotice(error instanceof ApiError ? error.message : `Unexpected error: ${error}`);
    if (!(error instanceof ApiError)) console.error(error);
  }

  function formatAge(seconds) {
    if (seconds === null || seconds === undefined || Number.isNaN(seconds)) return "–";
    if (seconds < 10) return `${Math.max(0, seconds).toFixed(1)} s`;
    if (seconds < 60) return `${Math.round(seconds)} s`;
    const minutes = Math.floor(seconds / 60);
    if (minutes < 60) return `${minutes} min ${Math.round(seconds % 60)} s`;
    const hours = Math.floor(minutes / 60);
    if (hours < 48) return `${hours} h ${minutes % 60} min`;
    return `${Math.floor(hours / 24)} days`;
  }

  // Every time on the page is written one way: "2026-12-02 13:00:00 CET", in the browser's
  // time zone (the one its date inputs are read in), named, so that no reader has to guess
  // the date or the zone. The parts come from Intl; the order and separators are fixed here,
  // as locales disagree on them. en-US only for the zone's short name ("UTC", "GMT+5:30").
  const TIME_PARTS = new Intl.DateTimeFormat("en-US", {
    year: "numeric",
    month: "2-digit",
    day: "2-digit",
    hour: "2-digit",
    minute: "2-digit",
    second: "2-digit",
    hourCycle: "h23",
    timeZoneName: "short",
  });

  /** "2026-12-02 13:00:00 CET": a Date (or an ISO 8601 string) in the browser's zone. */
  function formatTime(value) {
    const date = value instanceof Date ? value : new Date(value);
    if (Number.isNaN(date.getTime())) return String(value);
    const part = Object.fromEntries(TIME_PARTS.formatToParts(date).map((p) => [p.type, p.value]));
    return `${part.year}-${part.month}-${part.day} ${part.hour}:${part.minute}:${part.second} ${part.timeZoneName}`;
  }

  /** The zone times are shown in, by its short name ("UTC", "CET"). */
  function timeZoneName() {
    return formatTime(new Date()).split(" ").slice(2).join(" ");
  }

  /** A <time> in the one format above; the API's own ISO 8601 text on hover. */
  function timeElement(iso) {
    if (!iso) return el("span", { className: "subtle" }, "–");
    return el("time", { datetime: iso, title: iso }, formatTime(iso));
  }

  function shortId(id) {
    return id ? String(id).slice(0, 8) : "–";
  }

  function instanceElement(id) {
    if (!id) return el("span", { className: "subtle" }, "–");
    return el("code", { title: id }, shortId(id));
  }

  function badge(status) {
    return el("span", { className: `badge status-${status}` }, status);
  }

  function taskLink(id, text) {
    return el("a", { href: pageHref(`/dashboard/tasks/${id}`) }, text === undefined ? `#${id}` : text);
  }

  /** The value of <input type="datetime-local"> (local wall time) as ISO 8601 with its offset. */
  function localInputToIso(value) {
    const date = new Date(value); // no zone in the value: the browser reads it as local time
    if (Number.isNaN(date.getTime())) return null;
    const pad = (n) => String(Math.abs(Math.trunc(n))).padStart(2, "0");
    const offset = -date.getTimezoneOffset();
    const sign = offset >= 0 ? "+" : "-";
    return (
      `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())}` +
      `T${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}` +
      `${sign}${pad(offset / 60)}:${pad(offset % 60)}`
    );
  }

  function newIdempotencyKey() {
    if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
    return `dash-${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`;
  }

  // ---------------------------------------------------------------- live feed

  const connection = document.getElementById("connection");

  function showConnection(mode, text) {
    connection.dataset.mode = mode;
    connection.textContent = text;
  }

  /**
   * Events from /events while the stream is up; `poll` every POLL_MS while it is down.
   * `resync` runs whenever the stream (re)opens, since events may have been missed meanwhile.
   */
  class LiveFeed {
    constructor(url, { onEvent, poll, resync }) {
      this.url = url;
      this.onEvent = onEvent;
      this.poll = poll;
      this.resync = resync;
      this.source = null;
      this.pollTimer = null;
      this.retryMs = 2000;
      this.stopped = false;
    }

    start() {
      if (!window.EventSource) {
        this.startPolling("no event stream in this browser");
        return;
      }
      this.connect();
    }

    connect() {
      if (this.stopped) return;
      const source = new EventSource(withKey(this.url));
      this.source = source;
      source.onopen = () => {
        this.retryMs = 2000;
        this.stopPolling();
        showConnection("live", "live");
        this.resync();
      };
      source.onerror = () => {
        if (this.stopped) return;
        this.startPolling("event stream lost");
        if (source.readyState === EventSource.CLOSED) {
          // The browser gave up (an HTTP error, e.g. 401 or 503): try again ourselves, slower.
          setTimeout(() => this.connect(), this.retryMs);
          this.retryMs = Math.min(this.retryMs * 2, 30000);
        }
      };
      // Events come unnamed, each with its `type` in its data. After a reconnect the browser
      // sends Last-Event-ID and gets what it missed; a `stream.reset` says that could not be
      // done (too long away, or another instance that no longer has them): resync.
      source.onmessage = (message) => {
        let event;
        try {
          event = JSON.parse(message.data);
        } catch (error) {
          return;
        }
        if (event.type === "stream.reset") {
          this.resync();
        } else if (EVENT_TYPES.includes(event.type)) {
          this.onEvent(event);
        }
      };
    }

    startPolling(reason) {
      showConnection("polling", `polling every ${POLL_MS / 1000} s (${reason})`);
      if (this.pollTimer !== null) return;
      this.pollTimer = setInterval(this.poll, POLL_MS);
      this.poll();
    }

    stopPolling() {
      clearInterval(this.pollTimer);
      this.pollTimer = null;
    }

    /** Stop listening and polling for good (the page has nothing left to watch). */
    stop() {
      this.stopped = true;
      this.stopPolling();
      if (this.source) this.source.close();
    }
  }

  // ---------------------------------------------------------------- overview: queue + instances

  function overviewPage() {
    const counts = Object.fromEntries(
      STATUSES.map((status) => [status, document.getElementById(`count-${status}`)]),
    );
    const oldestPending = document.getElementById("oldest-pending");
    const servedBy = document.getElementById("served-by");
    const throughput = new ThroughputChart(document.getElementById("throughput-chart"));
    const instances = new InstancesTable(document.getElementById("instances-table"));
    const queues = new QueuesTable(document.getElementById("queues-table"), () => refreshCounts());
    const tasks = new TasksTable();
    let lastQueue = null;
    let oldest = null; // {seconds, fetchedAt}

    async function refreshStatus() {
      const { data } = await api("/status");
      showNotice("");
      servedBy.textContent = `served by ${shortId(data.instance_id)} (${data.hostname}, pid ${data.pid})`;
      for (const status of STATUSES) counts[status].textContent = String(data.queue[status] ?? 0);
      if (lastQueue && connection.dataset.mode === "polling") {
        // Without events, the chart learns throughput from how the counts moved.
        throughput.add("completed", serverNow(), Math.max(0, data.queue.completed - lastQueue.completed));
        throughput.add("failed", serverNow(), Math.max(0, data.queue.failed - lastQueue.failed));
      }
      lastQueue = data.queue;
      instances.update(data.instances, data.instance_id);
      const queuesReadAt = performance.now();
      queues.update((await api("/queues/")).data, queuesReadAt);
      await refreshOldestPending(data.queue.pending);
    }

    async function refreshOldestPending(pending) {
      if (!pending) {
        oldest = null;
        renderOldest();
        return;
      }
      const { data } = await api("/metrics");
      const match = /^taskapp_queue_oldest_pending_age_seconds(?:\{[^}]*\})?\s+(\S+)/m.exec(data);
      const seconds = match ? Number(match[1]) : NaN;
      oldest = Number.isFinite(seconds) ? { seconds, fetchedAt: performance.now() } : null;
      renderOldest();
    }

    function renderOldest() {
      if (!oldest || oldest.seconds <= 0) {
        // Pending tasks that are not due yet (scheduled later, or backing off) wait for no one.
        oldestPending.textContent = lastQueue && lastQueue.pending ? "none due" : "–";
        oldestPending.title = "No pending task is due";
        return;
      }
      const seconds = oldest.seconds + (performance.now() - oldest.fetchedAt) / 1000;
      oldestPending.textContent = formatAge(seconds);
      oldestPending.title = "How long the oldest due pending task has waited";
    }

    const refreshCounts = coalesce(refreshStatus, 300);
    const refreshTasks = coalesce(() => tasks.load(), 600);

    const feed = new LiveFeed("/events", {
      onEvent(event) {
        if (event.type === "task.completed" || event.type === "task.failed") {
          throughput.addEvent(event);
        }
        instances.noteEvent(event);
        // A progress report changes no count and nothing the table shows.
        if (event.type.startsWith("task.") && event.type !== "task.progress") {
          refreshCounts();
          refreshTasks();
        }
      },
      poll() {
        refreshCounts();
        refreshTasks();
      },
      resync() {
        refreshCounts();
        refreshTasks();
      },
    });

    refreshCounts.now();
    tasks.load().catch(reportError);
    throughput.seed().catch(reportError);
    feed.start();
    setUpCreateForm(() => {
      refreshCounts();
      refreshTasks();
    });

    setInterval(() => {
      if (connection.dataset.mode === "live") refreshCounts();
    }, STATUS_REFRESH_MS);
    setInterval(() => {
      instances.tick();
      renderOldest();
      throughput.render();
    }, 1000);
  }

  function describeRate(rate) {
    return rate ? `${rate.limit} per ${rate.period_seconds}s` + (rate.burst > 1 ? ` (burst ${rate.burst})` : "") : "";
  }

  class QueuesTable {
    constructor(table, onChange) {
      this.body = table.tBodies[0];
      this.result = document.getElementById("queues-result");
      this.onChange = onChange;
      // The queue and the `paused` the result line describes, and since when (performance.now()):
      // once a read made after that shows otherwise, it is cleared.
      this.resultFor = null;
    }

    /** Show the queues, as read by a request started at `readAt` (performance.now()). */
    update(rows, readAt) {
      const about = this.resultFor && rows.find((queue) => queue.name === this.resultFor.name);
      const stale = this.resultFor && readAt > this.resultFor.since;
      if (stale && (!about || about.paused !== this.resultFor.paused)) {
        showResult(this.result, "", null);
        this.resultFor = null;
      }
      if (!rows.length) {
        this.body.replaceChildren(el("tr", {}, el("td", { colSpan: 6, className: "empty" }, "No queues yet")));
        return;
      }
      this.body.replaceChildren(...rows.map((queue) => this.row(queue)));
    }

    row(queue) {
      const limits = [
        queue.rate_limit ? `starts: ${describeRate(queue.rate_limit)}` : "",
        queue.key_concurrency_limit ? `${queue.key_concurrency_limit} running per key` : "",
        queue.key_rate_limit ? `per key: ${describeRate(queue.key_rate_limit)}` : "",
      ].filter(Boolean);
      const throttled = queue.throttled_until && Date.parse(queue.throttled_until) > serverNow();
      const state = queue.paused
        ? "paused"
        : throttled
          ? "throttled"
          : queue.throttled_keys
            ? `${queue.throttled_keys} key(s) throttled`
            : "running";
      const action = queue.paused ? "resume" : "pause";
      const button = el("button", { type: "button", className: "queue-action" }, queue.paused ? "Resume" : "Pause");
      button.dataset.queue = queue.name;
      button.addEventListener("click", () => this.act(queue, action, button));
      return el(
        "tr",
        { dataset: { queue: queue.name } },
        el("td", {}, queue.name),
        el("td", { className: "num" }, String(queue.counts.pending)),
        el("td", { className: "num" }, String(queue.counts.processing)),
        el("td", {}, limits.join("; ") || "none"),
        el("td", { className: "queue-state" }, state),
        el("td", {}, button),
      );
    }

    async act(queue, action, button) {
      const { name } = queue;
      button.disabled = true;
      this.resultFor = null;
      try {
        await api(`/queues/${encodeURIComponent(name)}/${action}`, { method: "POST" });
        showResult(this.result, action === "pause" ? `Paused ${name} on every instance.` : `Resumed ${name}.`, "ok");
        this.resultFor = { name, paused: action === "pause", since: performance.now() };
      } catch (error) {
        showResult(this.result, error instanceof ApiError ? error.message : String(error), "error");
        // Refused in the state shown.
        this.resultFor = { name, paused: queue.paused, since: performance.now() };
      }
      this.onChange();
    }
  }

  // How much newer than an event a heartbeat must be to overrule it. An instance lists a task
  // it claimed a moment after the claim commits (and the event's `at` is the claim's own
  // time), so a heartbeat written just after a claim may not list it yet.
  const HEARTBEAT_OVERRULES_AFTER_MS = 1000;

  /**
   * The instances, from /status's heartbeat rows; which task each one runs, from the events.
   *
   * A heartbeat row is written every few seconds (up to 5), so on its own it shows a task
   * running for up to 5 s after it finished, and an instance idle while it works. The events
   * say it at once: a claim (its instance_id is the one that runs it), a deletion, and any
   * event of a task that is not running any more. An event overrules the heartbeats older than
   * itself, and a heartbeat overrules the events older than it (a missed event, or one from
   * while the stream was down, is mended within a beat). Both times are the database's clock.
   */
  class InstancesTable {
    constructor(table) {
      this.body = table.tBodies[0];
      this.summary = document.getElementById("instances-summary");
      this.known = new Map(); // instance_id -> {row, fetchedAt, listed}
      this.servingId = null;
      this.ageCells = [];
      this.runs = new Map(); // task id -> {instanceId (null: runs nowhere), at (ms)}
      this.renderSoon = coalesce(() => this.render(), 100);
    }

    /** Learn from an event which instance runs a task now, or that none does. */
    noteEvent(event) {
      if (!event.type.startsWith("task.") || typeof event.task_id !== "number") return;
      const at = Date.parse(event.at);
      if (Number.isNaN(at)) return;
      let instanceId;
      if (event.type === VOCABULARY.claimed_event) {
        instanceId = event.instance_id;
      } else if (event.type === VOCABULARY.deleted_event || event.status !== VOCABULARY.running) {
        instanceId = null;
      } else {
        return; // still running where it ran (an edit's instance_id is the API's, not its runner's)
      }
      const known = this.runs.get(event.task_id);
      if (known && known.at > at) return;
      this.runs.set(event.task_id, { instanceId, at });
      this.renderSoon();
    }

    /** The tasks an instance runs: its last heartbeat's, corrected by the events since. */
    currentTasks(row) {
      const current = new Set(row.current_tasks);
      const beat = Date.parse(row.last_heartbeat) - HEARTBEAT_OVERRULES_AFTER_MS;
      for (const [taskId, run] of this.runs) {
        if (run.at <= beat) continue;
        if (run.instanceId === row.instance_id) current.add(taskId);
        else current.delete(taskId);
      }
      return [...current].sort((a, b) => a - b);
    }

    /** Forget the events every listed heartbeat has overruled. */
    forgetOverruled() {
      const beats = [...this.known.values()]
        .filter((entry) => entry.listed)
        .map((entry) => Date.parse(entry.row.last_heartbeat));
      if (!beats.length) return;
      const oldest = Math.min(...beats) - HEARTBEAT_OVERRULES_AFTER_MS;
      for (const [taskId, run] of this.runs) if (run.at <= oldest) this.runs.delete(taskId);
    }

    update(rows, servingId) {
      const now = performance.now();
      this.servingId = servingId;
      const listed = new Set(rows.map((row) => row.instance_id));
      for (const [id, entry] of this.known) {
        if (listed.has(id) || !entry.listed) continue;
        entry.listed = false;
        entry.stopped = this.age(entry) < stoppedBeforeSeconds;
      }
      for (const row of rows) {
        this.known.set(row.instance_id, { row, fetchedAt: now, listed: true, stopped: false });
      }
      this.forgetOverruled();
      // Keep one that left the list in sight a while: a minute when stopped, 10 when dead.
      for (const [id, entry] of this.known) {
        if (!entry.listed && this.age(entry) > (entry.stopped ? 60 : 600)) this.known.delete(id);
      }
      this.render();
    }

    age(entry) {
      if (entry.listed) {
        return entry.row.heartbeat_age_seconds + (performance.now() - entry.fetchedAt) / 1000;
      }
      return (serverNow() - Date.parse(entry.row.last_heartbeat)) / 1000;
    }

    state(entry) {
      if (!entry.listed) return entry.stopped ? "stopped" : "dead";
      // Judged on the age /status reported: between two reads the shown age grows by itself.
      if (entry.row.heartbeat_age_seconds > deadAfterSeconds) return "dead";
      if (!entry.row.worker_running) return "no worker";
      return this.currentTasks(entry.row).length ? "working" : "idle";
    }

    render() {
      const entries = [...this.known.values()].sort((a, b) =>
        `${a.row.hostname}:${String(a.row.pid).padStart(10)}`.localeCompare(
          `${b.row.hostname}:${String(b.row.pid).padStart(10)}`,
        ),
      );
      this.ageCells = [];
      const rows = entries.map((entry) => {
        const { row } = entry;
        const state = this.state(entry);
        const running = entry.listed ? this.currentTasks(row) : [];
        const current = running.length
          ? running.flatMap((id, i) => (i ? [", ", taskLink(id)] : [taskLink(id)]))
          : [el("span", { className: "subtle" }, "–")];
        const ageCell = el("td", { className: "num" });
        this.ageCells.push({ cell: ageCell, entry });
        const serving = row.instance_id === this.servingId;
        return el(
          "tr",
          { className: `instance-${state.replace(" ", "-")}`, dataset: { instanceId: row.instance_id, state } },
          el(
            "td",
            { className: "nowrap" },
            instanceElement(row.instance_id),
            serving ? el("span", { className: "tag", title: "answered this page's /status" }, "this page") : null,
          ),
          el("td", { className: "nowrap" }, `${row.hostname} · ${row.pid}`),
          el("td", {}, el("span", { className: `state state-${state.replace(" ", "-")}` }, state)),
          el("td", {}, ...current),
          el("td", { className: "num" }, row.processed),
          el("td", { className: "num" }, row.failed),
          ageCell,
          el("td", {}, timeElement(row.started_at)),
        );
      });
      if (!rows.length) {
        rows.push(el("tr", {}, el("td", { colspan: 8, className: "empty" }, "No live instance.")));
      }
      this.body.replaceChildren(...rows);
      this.tick();
    }

    tick() {
      let alive = 0;
      let working = 0;
      for (const { cell, entry } of this.ageCells) {
        const age = this.age(entry);
        cell.textContent = formatAge(age);
        const state = this.state(entry);
        cell.classList.toggle("late", state === "dead");
        const row = cell.parentElement;
        if (row.dataset.state !== state) {
          row.dataset.state = state;
          row.className = `instance-${state.replace(" ", "-")}`;
          const badge = row.querySelector(".state");
          badge.className = `state state-${state.replace(" ", "-")}`;
          badge.textContent = state;
        }
        if (state !== "dead" && state !== "stopped") alive += 1;
        if (state === "working") working += 1;
      }
      this.summary.textContent = `${alive} alive, ${working} working`;
    }
  }

  // ---------------------------------------------------------------- overview: throughput chart

  const SVG = "http://www.w3.org/2000/svg";

  function svg(tag, attrs = {}, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  /** Tasks finished per 5-second bucket over the last 3 minutes, drawn as stacked SVG bars. */
  class ThroughputChart {
    static BUCKET_MS = 5000;
    static BUCKETS = 36;

    constructor(container) {
      this.container = container;
      this.summary = document.getElementById("throughput-summary");
      this.buckets = new Map(); // bucket number -> {completed, failed}
      this.seen = new Set(); // "completed:12:<ms>": one finish counted once, seeded or live
    }

    /** Fill the window from the tasks that finished lately, read from the task list. */
    async seed() {
      const since = serverNow() - ThroughputChart.BUCKETS * ThroughputChart.BUCKET_MS;
      for (const status of ["completed", "failed"]) {
        const probe = await api(`/tasks/?status=${status}&limit=1`);
        const total = Number(probe.response.headers.get("X-Total-Count")) || 0;
        if (!total) continue;
        const limit = Math.min(total, 500);
        const { data } = await api(`/tasks/?status=${status}&limit=${limit}&offset=${total - limit}`);
        for (const task of data) {
          const at = Date.parse(status === "completed" ? task.processed_at : task.updated_at);
          if (at >= since) this.count(status, task.id, at);
        }
      }
      this.render();
    }

    addEvent(event) {
      const status = event.type === "task.completed" ? "completed" : "failed";
      const at = Date.parse(event.at);
      this.count(status, event.task_id, Number.isNaN(at) ? serverNow() : at);
      this.render();
    }

    count(status, taskId, at) {
      const key = `${status}:${taskId}:${at}`;
      if (this.seen.has(key)) return;
      this.seen.add(key);
      this.add(status, at, 1);
    }

    add(status, at, n) {
      if (!n) return;
      const bucket = Math.floor(at / ThroughputChart.BUCKET_MS);
      const entry = this.buckets.get(bucket) || { completed: 0, failed: 0 };
      entry[status] += n;
      this.buckets.set(bucket, entry);
    }

    render() {
      const { BUCKET_MS, BUCKETS } = ThroughputChart;
      const last = Math.floor(serverNow() / BUCKET_MS);
      const first = last - BUCKETS + 1;
      for (const bucket of this.buckets.keys()) if (bucket < first) this.buckets.delete(bucket);
      for (const key of this.seen) if (Number(key.split(":")[2]) < first * BUCKET_MS) this.seen.delete(key);

      const series = [];
      for (let b = first; b <= last; b += 1) series.push(this.buckets.get(b) || { completed: 0, failed: 0 });
      const peak = Math.max(1, ...series.map((s) => s.completed + s.failed));
      const scale = niceCeiling(peak);

      // Drawn at the container's own size, so the text is never stretched.
      const width = Math.max(320, Math.round(this.container.clientWidth || 600));
      const height = 150;
      const left = 34;
      const bottom = 18;
      const plotHeight = height - bottom - 8;
      const slot = (width - left) / BUCKETS;
      const y = (value) => height - bottom - (value / scale) * plotHeight;

      const chart = svg("svg", {
        viewBox: `0 0 ${width} ${height}`,
        width,
        height,
        class: "throughput",
        role: "img",
      });
      const lastMinute = series.slice(-60000 / BUCKET_MS).reduce(
        (sum, s) => ({ completed: sum.completed + s.completed, failed: sum.failed + s.failed }),
        { completed: 0, failed: 0 },
      );
      const total = series.reduce((sum, s) => sum + s.completed + s.failed, 0);
      const label =
        `In the last minute ${lastMinute.completed} completed and ${lastMinute.failed} failed; ` +
        `${total} finished in the last ${(BUCKETS * BUCKET_MS) / 60000} minutes.`;
      chart.append(svg("title", {}, label));

      for (const value of [scale, scale / 2]) {
        chart.append(svg("line", { x1: left, x2: width, y1: y(value), y2: y(value), class: "grid" }));
        chart.append(svg("text", { x: left - 6, y: y(value) + 4, class: "axis", "text-anchor": "end" }, formatCount(value)));
      }
      chart.append(svg("line", { x1: left, x2: width, y1: y(0), y2: y(0), class: "baseline" }));
      chart.append(svg("text", { x: left - 6, y: y(0) + 4, class: "axis", "text-anchor": "end" }, "0"));
      const minutes = (BUCKETS * BUCKET_MS) / 60000;
      for (let m = minutes; m >= 0; m -= 1) {
        const x = left + ((minutes - m) / minutes) * (width - left);
        const anchor = m === minutes ? "start" : m === 0 ? "end" : "middle";
        chart.append(svg("text", { x, y: height - 4, class: "axis", "text-anchor": anchor }, m ? `−${m} min` : "now"));
      }

      series.forEach((s, i) => {
        const x = left + i * slot + 1;
        const barWidth = Math.max(1, slot - 2);
        if (s.completed) {
          chart.append(
            svg("rect", { x, width: barWidth, y: y(s.completed), height: y(0) - y(s.completed), class: "bar-completed" }),
          );
        }
        if (s.failed) {
          const top = s.completed + s.failed;
          chart.append(
            svg("rect", { x, width: barWidth, y: y(top), height: y(s.completed) - y(top), class: "bar-failed" }),
          );
        }
      });

      this.container.replaceChildren(chart);
      this.container.setAttribute("aria-label", label);
      this.summary.replaceChildren(
        el(
          "span",
          {},
          el("span", { className: "legend legend-completed" }, "completed"),
          el("span", { className: "legend legend-failed" }, "failed"),
          el("span", { className: "subtle" }, `one bar per ${BUCKET_MS / 1000} s`),
        ),
        el(
          "span",
          {},
          "last minute: ",
          el("strong", {}, `${lastMinute.completed} completed`),
          `, ${lastMinute.failed} failed`,
        ),
      );
    }
  }

  function niceCeiling(value) {
    const magnitude = 10 ** Math.floor(Math.log10(value));
    for (const step of [1, 2, 5, 10]) if (value <= step * magnitude) return step * magnitude;
    return 10 * magnitude;
  }

  function formatCount(value) {
    return Number.isInteger(value) ? String(value) : value.toFixed(1);
  }

  // ---------------------------------------------------------------- overview: tasks table

  /**
   * Newest first: the API lists by id, so each page is a slice counted from the end.
   * The filter and the page live in the address (`?status=failed&page=2`, page 1 and "all"
   * left out), so a reload, a bookmark, back and forward all show the same slice again.
   */
  class TasksTable {
    constructor() {
      this.body = document.querySelector("#tasks-table tbody");
      this.filter = document.getElementById("status-filter");
      this.range = document.getElementById("tasks-range");
      this.newer = document.getElementById("tasks-newer");
      this.older = document.getElementById("tasks-older");
      this.page = 0;
      this.totals = new Map(); // status filter -> last X-Total-Count
      this.readAddress();
      this.filter.addEventListener("change", () => {
        this.page = 0;
        this.writeAddress();
        this.load().catch(reportError);
      });
      document.getElementById("tasks-filter").addEventListener("submit", (e) => e.preventDefault());
      this.newer.addEventListener("click", () => this.go(-1));
      this.older.addEventListener("click", () => this.go(1));
      window.addEventListener("popstate", () => {
        this.readAddress();
        this.load().catch(reportError);
      });
    }

    /** Take the filter and the page from the address; what it can't be is read as the default. */
    readAddress() {
      const params = new URLSearchParams(location.search);
      const status = params.get("status");
      this.filter.value = STATUSES.includes(status) ? status : "";
      const page = Number(params.get("page"));
      this.page = Number.isInteger(page) && page >= 1 ? page - 1 : 0;
    }

    /** Put the filter and the page in the address: a new history entry, or (`replace`) not. */
    writeAddress(replace = false) {
      const params = new URLSearchParams(location.search);
      for (const [name, value] of [
        ["status", this.filter.value],
        ["page", this.page ? String(this.page + 1) : ""],
      ]) {
        if (value) params.set(name, value);
        else params.delete(name);
      }
      const query = params.toString();
      const url = location.pathname + (query ? `?${query}` : "") + location.hash;
      if (url === location.pathname + location.search + location.hash) return;
      if (replace) history.replaceState(null, "", url);
      else history.pushState(null, "", url);
    }

    go(step) {
      this.page = Math.max(0, this.page + step);
      this.writeAddress();
      this.load().catch(reportError);
    }

    async load() {
      const status = this.filter.value;
      const query = status ? `status=${encodeURIComponent(status)}&` : "";
      let total = this.totals.get(status);
      if (total === undefined) total = await this.fetchTotal(query);
      // Two tries: the total can move between the count we had and the page we read.
      for (let attempt = 0; attempt < 2; attempt += 1) {
        const pages = Math.max(1, Math.ceil(total / TASKS_PAGE_SIZE));
        if (this.page > pages - 1) {
          this.page = pages - 1; // a page past the end (an old address): show the last one
          this.writeAddress(true);
        }
        const end = total - this.page * TASKS_PAGE_SIZE;
        const offset = Math.max(0, end - TASKS_PAGE_SIZE);
        const limit = Math.max(1, end - offset);
        const { data, response } = await api(`/tasks/?${query}limit=${limit}&offset=${offset}`);
        const actual = Number(response.headers.get("X-Total-Count"));
        if (status !== this.filter.value) return; // the filter changed meanwhile
        this.totals.set(status, actual);
        if (actual !== total && attempt === 0) {
          total = actual;
          continue;
        }
        this.render(data.slice(0, limit).reverse(), offset, actual);
        return;
      }
    }

    async fetchTotal(query) {
      const { response } = await api(`/tasks/?${query}limit=1`);
      return Number(response.headers.get("X-Total-Count")) || 0;
    }

    render(tasks, offset, total) {
      const rows = tasks.map((task) =>
        el(
          "tr",
          { dataset: { taskId: task.id, status: task.status } },
          el("td", { className: "num" }, taskLink(task.id)),
          el(
            "td",
            { className: "title-cell" },
            taskLink(task.id, task.title),
            task.scheduled_for && Date.parse(task.scheduled_for) > serverNow()
              ? el("span", { className: "tag", title: `not before ${formatTime(task.scheduled_for)}` }, "scheduled")
              : null,
          ),
          el("td", {}, badge(task.status)),
          el("td", { className: "num" }, task.priority),
          el("td", { className: "num" }, `${task.attempts}/${task.max_attempts}`),
          el("td", {}, instanceElement(task.processing_instance_id)),
          el("td", {}, timeElement(task.created_at)),
          el("td", {}, timeElement(task.processed_at)),
        ),
      );
      if (!rows.length) {
        const filter = this.filter.value;
        const text = filter ? `No ${filter} task.` : "No task yet: create one with the form.";
        rows.push(el("tr", {}, el("td", { colspan: 8, className: "empty" }, text)));
      }
      this.body.replaceChildren(...rows);
      // Row i of the ascending page is number (total - offset - i) counted from the newest.
      this.range.textContent = tasks.length
        ? `${total - offset - tasks.length + 1}–${total - offset} of ${total}, newest first`
        : `0 of ${total}`;
      this.newer.disabled = this.page === 0;
      this.older.disabled = offset === 0;
    }
  }

  // ---------------------------------------------------------------- overview: create form

  function setUpCreateForm(onCreated) {
    const form = document.getElementById("create-form");
    const result = document.getElementById("create-result");
    const submit = form.querySelector("button[type=submit]");
    let idempotencyKey = null; // kept across resubmits of the same input, so a retry is no duplicate
    // The input is read in the browser's zone, the one every time on the page is shown in.
    document.getElementById("create-scheduled-zone").textContent = `optional, ${timeZoneName()}`;

    form.addEventListener("input", () => {
      idempotencyKey = null;
      // "Created task #7." is about the last input: a new one makes it old news.
      if (result.classList.contains("ok")) showResult(result, "", null);
    });

    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      clearFieldErrors(form);
      result.className = "form-result";
      const body = { title: form.elements.title.value };
      const description = form.elements.description.value;
      if (description.trim()) body.description = description;
      const priority = form.elements.priority.value.trim();
      if (priority) body.priority = Number(priority);
      if (form.elements.scheduled_for.value) {
        body.scheduled_for = localInputToIso(form.elements.scheduled_for.value);
      }
      const conversations = form.elements.conversations.value
        .split("\n")
        .map((line) => line.trim())
        .filter(Boolean);
      if (conversations.length) body.conversations = conversations.map((content) => ({ content }));

      idempotencyKey = idempotencyKey || newIdempotencyKey();
      submit.disabled = true;
      result.textContent = "Creating…";
      try {
        const { data } = await api("/tasks/", {
          method: "POST",
          json: body,
          headers: { "Idempotency-Key": idempotencyKey },
        });
        idempotencyKey = null;
        form.reset();
        result.classList.add("ok");
        result.replaceChildren("Created ", taskLink(data.id, `task #${data.id}`), ".");
        onCreated(data);
      } catch (error) {
        result.classList.add("error");
        result.textContent = error instanceof ApiError ? firstLine(error) : String(error);
        if (error instanceof ApiError) showFieldErrors(form, error.problem);
      } finally {
        submit.disabled = false;
      }
    });
  }

  function firstLine(error) {
    return error.message.split("\n")[0];
  }

  function clearFieldErrors(form) {
    for (const node of form.querySelectorAll(".field-error")) node.remove();
    for (const input of form.querySelectorAll("[aria-invalid]")) {
      input.removeAttribute("aria-invalid");
      input.removeAttribute("aria-describedby");
    }
  }

  /** Put each message of a 422's `errors` under its field ("conversations.0.content" too). */
  function showFieldErrors(form, problem) {
    if (!problem || !problem.errors) return;
    for (const [name, messages] of Object.entries(problem.errors)) {
      const field = name.split(".")[0];
      const input = form.elements[field];
      const text = (field === name ? "" : `${name}: `) + [].concat(messages).join(" ");
      if (!input || !input.id) continue;
      const id = `${input.id}-error`;
      let holder = document.getElementById(id);
      if (!holder) {
        holder = el("p", { id, className: "field-error" });
        input.closest(".field").append(holder);
      }
      holder.textContent = holder.textContent ? `${holder.textContent} ${text}` : text;
      input.setAttribute("aria-invalid", "true");
      input.setAttribute("aria-describedby", id);
    }
  }

  // ---------------------------------------------------------------- task page

  const RETRYABLE = new Set(VOCABULARY.actions.retry);
  const CANCELLABLE = new Set(VOCABULARY.actions.cancel);
  // Live output kept on the page per conversation (the oldest is dropped beyond this), and how
  // many chunks may wait for a missing earlier one before the gap is given up on.
  const OUTPUT_MAX_CHARACTERS = 200000;
  const OUTPUT_MAX_WAITING = 100;

  /** The processor's last progress report: "3 / 10" with a bar, its message and its time. */
  function progressElements(progress) {
    if (!progress) return ["No progress reported."];
    const { done, total, message, at } = progress;
    const parts = [];
    if (total === null || total === undefined) {
      parts.push(el("span", { className: "progress-count" }, `${done} done`));
    } else {
      const percent = total > 0 ? Math.min(100, (100 * done) / total) : done > 0 ? 100 : 0;
      const fill = el("span", { className: "progress-fill" });
      fill.style.width = `${percent}%`;
      parts.push(
        el(
          "span",
          {
            className: "progress-bar",
            role: "progressbar",
            "aria-label": "Progress",
            "aria-valuemin": 0,
            "aria-valuemax": total,
            "aria-valuenow": Math.min(done, Math.max(total, 0)),
          },
          fill,
        ),
        el("span", { className: "progress-count" }, `${done} / ${total}`),
      );
    }
    parts.push(el("span", { className: "progress-at subtle" }, "reported ", timeElement(at)));
    const line = el("div", { className: "progress-line" }, ...parts);
    return message ? [line, el("p", { className: "progress-message" }, message)] : [line];
  }

  /**
   * One conversation's live output (conversation.output events), as text, in `seq` order.
   * Chunks are numbered from 0 per attempt: a 0 after others starts a new attempt's block, and
   * the blocks of earlier attempts stay above it. Nothing of it is stored anywhere: it lives
   * as long as the page.
   */
  class LiveOutput {
    constructor(conversationId) {
      this.node = el(
        "div",
        { className: "live-output", dataset: { conversationId } },
        el("p", { className: "live-output-label" }, "live output"),
      );
      this.block = null; // the current attempt's <pre>
      this.next = 0; // the seq to append next
      this.waiting = new Map(); // seq -> text, arrived before an earlier one
      this.characters = 0;
      this.mayHaveMissed = false; // the stream reopened: what it missed won't come
    }

    add(seq, text) {
      if (!Number.isInteger(seq) || seq < 0 || typeof text !== "string") return;
      if (this.block === null || (seq === 0 && this.next > 0)) this.startBlock();
      if (seq < this.next || this.waiting.has(seq)) return; // a repeat
      if (seq > this.next && this.waiting.size === 0) {
        // Chunks come in order on one stream: a later one first means the earlier ones were
        // sent before this page watched, or while its stream was down. They won't come.
        if (!this.block.firstChild) this.skipTo(seq, "output sent before this page watched");
        else if (this.mayHaveMissed) this.skipTo(seq, "output missed while the stream was down");
      }
      this.mayHaveMissed = false;
      this.waiting.set(seq, text);
      this.flush();
      if (this.waiting.size > OUTPUT_MAX_WAITING) {
        this.skipTo(Math.min(...this.waiting.keys()), "output missed here");
        this.flush();
      }
    }

    startBlock() {
      if (this.block !== null) {
        this.block.classList.add("earlier");
        this.block.title = "an earlier attempt's output";
      }
      this.block = el("pre", { className: "live-output-text" });
      this.node.append(this.block);
      this.next = 0;
      this.waiting.clear();
    }

    flush() {
      const follow = this.block.scrollHeight - this.block.scrollTop - this.block.clientHeight < 4;
      while (this.waiting.has(this.next)) {
        const text = this.waiting.get(this.next);
        this.waiting.delete(this.next);
        this.block.append(document.createTextNode(text));
        this.characters += text.length;
        this.next += 1;
      }
      this.trim();
      if (follow) this.block.scrollTop = this.block.scrollHeight;
    }

    /** Give up on the chunks before `seq`: mark the gap, saying why on hover. */
    skipTo(seq, why) {
      this.block.append(el("span", { className: "output-gap", title: why }, "… "));
      this.next = seq;
    }

    trim() {
      while (this.characters > OUTPUT_MAX_CHARACTERS) {
        const first = this.node.querySelector(".live-output-text");
        const node = first && first.firstChild;
        if (!node) break;
        if (node.nodeType === Node.TEXT_NODE) this.characters -= node.textContent.length;
        node.remove();
        if (!first.firstChild && first !== this.block) first.remove();
      }
    }
  }

  function taskPage() {
    const taskId = Number(body.dataset.taskId);
    const title = document.getElementById("task-title");
    const status = document.getElementById("task-status");
    const fields = document.getElementById("task-fields");
    const description = document.getElementById("task-description");
    const result = document.getElementById("task-result");
    const conversations = document.getElementById("conversations");
    const errors = document.querySelector("#errors-table tbody");
    const retry = document.getElementById("retry-button");
    const cancel = document.getElementById("cancel-button");
    const hint = document.getElementById("action-hint");
    const actionResult = document.getElementById("action-result");
    const progressBox = document.getElementById("task-progress");
    const outputs = new Map(); // conversation id -> LiveOutput
    let gone = false;
    // The status the action result describes, and since when (performance.now()): once a read
    // made after that shows the task in another state, the result is old news.
    let resultFor = null;
    let progress = null; // the report shown
    let progressEventAt = -Infinity; // performance.now() when an event last set it

    function showProgress(report) {
      progress = report || null;
      progressBox.replaceChildren(...progressElements(progress));
      progressBox.classList.toggle("subtle", !progress);
    }

    /**
     * The task's `progress` from a read started at `readAt` (performance.now()). A
     * task.progress event that arrived after the read started may be newer than what it
     * returned: the older of the two is not shown.
     */
    function takeProgress(report, readAt) {
      const newer = report && progress && Date.parse(report.at) >= Date.parse(progress.at);
      if (readAt > progressEventAt || newer) showProgress(report);
    }

    function outputFor(conversationId) {
      let output = outputs.get(conversationId);
      if (!output) {
        output = new LiveOutput(conversationId);
        outputs.set(conversationId, output);
        const item = [...conversations.children].find(
          (li) => li.dataset.conversationId === String(conversationId),
        );
        if (item) item.append(output.node);
      }
      return output;
    }

    function onEvent(event) {
      if (event.task_id !== taskId) return;
      if (event.type === "conversation.output") {
        if (event.output) outputFor(event.conversation_id).add(event.output.seq, event.output.text);
        return; // not stored: nothing to read again
      }
      if (event.type === "task.progress") {
        progressEventAt = performance.now();
        showProgress(event.progress);
        return; // the report is in the event
      }
      refresh();
    }

    function render(task, readAt) {
      document.title = `Task ${task.id}: ${task.title} · taskapp`;
      title.textContent = task.title;
      status.className = `badge status-${task.status}`;
      status.textContent = task.status;
      body.dataset.taskStatus = task.status;
      if (resultFor !== null && readAt > resultFor.since && task.status !== resultFor.status) {
        showResult(actionResult, "", null);
        resultFor = null;
      }

      retry.disabled = !RETRYABLE.has(task.status);
      cancel.disabled = !CANCELLABLE.has(task.status);
      if (retry.disabled && cancel.disabled) {
        hint.textContent = `A ${task.status} task can be neither retried nor cancelled.`;
      } else if (!cancel.disabled && task.status === "processing") {
        hint.textContent = "Cancel stops its processor; the conversations it checkpointed stay processed.";
      } else {
        hint.textContent = "";
      }

      const rows = [
        ["Priority", task.priority],
        ["Attempts", `${task.attempts} of ${task.max_attempts}`],
        [
          "Timeout",
          task.timeout_seconds === null || task.timeout_seconds === undefined
            ? el("span", { className: "subtle", title: "the service's TASK_TIMEOUT_SECONDS" }, "default")
            : `${task.timeout_seconds} s`,
        ],
        ["Deferrals", task.deferrals ?? 0],
        ["Instance", instanceElement(task.processing_instance_id)],
        ["Not before", timeElement(task.scheduled_for)],
        ["Created", timeElement(task.created_at)],
        ["Updated", timeElement(task.updated_at)],
        ["Processed", timeElement(task.processed_at)],
        ["Last error", task.last_error ? el("code", { className: "error-text" }, task.last_error) : "–"],
      ];
      fields.replaceChildren(
        ...rows.flatMap(([name, value]) => [el("dt", {}, name), el("dd", {}, value)]),
      );
      description.textContent = task.description || "No description.";
      description.classList.toggle("subtle", !task.description);
      // The processor's return value, as JSON text (never markup).
      result.textContent = task.result === null ? "No result." : JSON.stringify(task.result, null, 2);
      result.classList.toggle("subtle", task.result === null);
      takeProgress(task.progress, readAt);

      conversations.replaceChildren(
        ...task.conversations.map((c) =>
          el(
            "li",
            { dataset: { conversationId: c.id } },
            el("p", { className: "conversation-content" }, c.content),
            el(
              "p",
              { className: "conversation-meta" },
              badge(c.status),
              " ",
              c.processed_at ? "processed " : "updated ",
              timeElement(c.processed_at || c.updated_at),
            ),
            c.result === null ? null : el("pre", { className: "result conversation-result" }, JSON.stringify(c.result)),
            outputs.has(c.id) ? outputs.get(c.id).node : null,
          ),
        ),
      );
      if (!task.conversations.length) conversations.replaceChildren(el("li", { className: "subtle" }, "None."));

      const errorRows = [...task.errors].reverse().map((e) =>
        el(
          "tr",
          {},
          el("td", { className: "num" }, e.attempt),
          el("td", {}, instanceElement(e.instance_id)),
          el("td", {}, el("code", { className: "error-text" }, e.error)),
          el("td", {}, timeElement(e.at)),
        ),
      );
      if (!errorRows.length) {
        errorRows.push(el("tr", {}, el("td", { colspan: 4, className: "empty" }, "No failed attempt.")));
      }
      errors.replaceChildren(...errorRows);
    }

    async function load() {
      if (gone) return;
      try {
        const readAt = performance.now();
        const { data } = await api(`/tasks/${taskId}`);
        showNotice("");
        render(data, readAt);
      } catch (error) {
        if (error instanceof ApiError && error.status === 404) {
          showGone();
          return;
        }
        throw error;
      }
    }

    /** The task is gone (deleted while shown): the page becomes its 404 page, and stops. */
    function showGone() {
      if (gone) return; // a read and an action can both learn it
      gone = true;
      feed.stop();
      const panel = document.getElementById("not-found-template").content.cloneNode(true);
      panel.getElementById("not-found-reason").textContent = "It was deleted while this page showed it.";
      for (const link of panel.querySelectorAll("a[data-page-link]")) {
        link.href = pageHref(link.getAttribute("href"));
      }
      document.getElementById("task-details").remove();
      document.getElementById("task-panel").replaceWith(panel);
      document.title = `Task ${taskId} not found · taskapp`;
      body.dataset.taskStatus = "not-found";
      showNotice("");
      showConnection("closed", "not watching: no such task");
    }

    async function act(action, button) {
      button.disabled = true;
      resultFor = null;
      showResult(actionResult, `${button.textContent}…`, null);
      try {
        const readAt = performance.now();
        const { data } = await api(`/tasks/${taskId}/${action}`, { method: "POST" });
        showResult(actionResult, action === "retry" ? "Sent back to the queue." : "Cancelled.", "ok");
        // Reads started before the answer came may still show the state before the action.
        resultFor = { status: data.status, since: performance.now() };
        render(data, readAt);
      } catch (error) {
        if (error instanceof ApiError && error.status === 404) {
          showGone();
          return;
        }
        showResult(actionResult, error instanceof ApiError ? error.message : String(error), "error");
        // Refused in the state shown.
        const shown = body.dataset.taskStatus;
        resultFor = shown ? { status: shown, since: performance.now() } : null;
        refresh();
      }
    }

    retry.addEventListener("click", () => act("retry", retry));
    cancel.addEventListener("click", () => act("cancel", cancel));

    const refresh = coalesce(load, 200);
    const feed = new LiveFeed(`/events?task_id=${taskId}`, {
      onEvent,
      poll: () => refresh(),
      resync: () => {
        // Chunks sent while the stream was down are not coming: don't wait for them.
        for (const output of outputs.values()) output.mayHaveMissed = true;
        refresh();
      },
    });
    refresh.now();
    feed.start();
  }

  // ---------------------------------------------------------------- start

  takeKeyFromUrl();
  setUpKeyControls();
  if (body.dataset.page === "overview") overviewPage();
  else if (body.dataset.page === "task") taskPage();
  else if (body.dataset.page === "task-missing") showConnection("closed", "not watching: no such task");
})();
