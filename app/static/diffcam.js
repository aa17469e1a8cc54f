// diffcam page client: camera → WebRTC → /offer → stylized video back; controls over a data channel.
// Or, with a listed stream picked (OBS over WHIP, a --source), its output over WHEP, steered over HTTP.
(() => {
  const POLL_MS = 3000;  // how often the stream list is refreshed while the page is visible
  const HELP = {
    insecure: "This page cannot use a camera: browsers give the camera only to secure pages (https, or " +
      "http://127.0.0.1 and http://localhost on the machine itself), and this one was opened over plain http " +
      "from another machine. Restart diffcam with --https and open the https:// address it prints, or open " +
      "http://127.0.0.1 on the machine that runs diffcam.",
    denied: "The camera is blocked for this page. Click the camera icon in the address bar (or the icon left " +
      "of the address → Site settings), allow the camera, then press Start again.",
    missing: "No camera found (or the chosen one is gone). Plug one in or pick another camera; or send video " +
      "from OBS over WHIP instead (see the README, \"Use with OBS\").",
    busy: "The camera is in use by another application (or the system refused it). Close the other app, or " +
      "pick another camera, then press Start again.",
  };
  const state = {
    pc: null, channel: null, stream: null, sender: null, closeUrl: null,
    params: {}, lastSent: [], config: null, watching: null, steer: { pending: {}, busy: false },
  };
  const $ = (id) => document.getElementById(id);
  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  function status(text, kind = "info") {
    const el = $("diffcam-status");
    if (el) { el.textContent = text; el.dataset.kind = kind; }
  }

  function buttons(running) {
    if ($("diffcam-start")) $("diffcam-start").disabled = running;
    if ($("diffcam-stop")) $("diffcam-stop").disabled = !running;
  }

  /** Why this page cannot have a camera at all, or null. */
  function insecure() {
    return window.isSecureContext === false || !navigator.mediaDevices ? HELP.insecure : null;
  }

  /** What to tell the user about a getUserMedia failure. */
  function cameraError(error) {
    const name = error && error.name;
    if (name === "NotAllowedError" || name === "SecurityError") return HELP.denied;
    if (name === "NotFoundError" || name === "OverconstrainedError") return HELP.missing;
    if (name === "NotReadableError" || name === "AbortError") return HELP.busy;
    return `camera: ${error && error.message || error}`;
  }

  // ---------------------------------------------------------------- server configuration

  function clientConfig() {
    state.config ||= fetch("client-config").then((r) => (r.ok ? r.json() : {})).catch(() => ({}));
    return state.config;
  }

  async function peerConnection() {
    const config = await clientConfig();
    return new RTCPeerConnection({ iceServers: config.ice_servers || [] });
  }

  function waitForIce(pc) {
    if (pc.iceGatheringState === "complete") return Promise.resolve();
    return new Promise((resolve) => {
      pc.addEventListener("icegatheringstatechange", () => { if (pc.iceGatheringState === "complete") resolve(); });
      setTimeout(resolve, 3000);  // answer with what we have rather than hang
    });
  }

  // ---------------------------------------------------------------- cameras

  /** Fill the camera list; before permission the browser gives no labels, so they are numbered. */
  async function listCameras() {
    const select = $("diffcam-camera");
    if (!select || insecure()) return;
    const devices = (await navigator.mediaDevices.enumerateDevices()).filter((d) => d.kind === "videoinput");
    const chosen = state.stream?.getVideoTracks()[0]?.getSettings().deviceId || select.value;
    select.replaceChildren(...devices.map((d, i) => new Option(d.label || `camera ${i + 1}`, d.deviceId)));
    if (!devices.length) select.appendChild(new Option("no camera found", ""));
    if (chosen && devices.some((d) => d.deviceId === chosen)) select.value = chosen;
  }

  function openCamera(deviceId) {
    const video = { width: 640, height: 480, ...(deviceId ? { deviceId: { exact: deviceId } } : {}) };
    return navigator.mediaDevices.getUserMedia({ video, audio: false });
  }

  function preview(stream) {
    const local = $("diffcam-local");
    if (local) local.srcObject = stream;
  }

  /** Switch a running stream to another camera without renegotiating; otherwise the choice waits for Start. */
  async function switchCamera(deviceId = $("diffcam-camera")?.value) {
    if (!state.sender) return;
    try {
      const stream = await openCamera(deviceId);
      const old = state.stream;
      await state.sender.replaceTrack(stream.getVideoTracks()[0]);
      state.stream = stream;
      preview(stream);
      old?.getTracks().forEach((t) => t.stop());
      listCameras();
    } catch (error) {
      status(cameraError(error), "error");
    }
  }

  function mirror(on) { $("diffcam-stage")?.classList.toggle("mirrored", on); }
  function showPreview(on) { $("diffcam-stage")?.classList.toggle("no-preview", !on); }

  function fullscreen() {
    const stage = $("diffcam-stage");
    if (document.fullscreenElement) document.exitFullscreen();
    else stage?.requestFullscreen?.().catch((error) => status(`full screen: ${error.message}`, "error"));
  }

  // ---------------------------------------------------------------- my camera, streamed

  async function start() {
    if (state.watching) return watch(state.watching.id);
    if (state.pc) return;
    const problem = insecure();
    if (problem) { status(problem, "error"); return; }
    buttons(true);
    let pc;
    try {
      status("asking for the camera…");
      try {
        state.stream = await openCamera($("diffcam-camera")?.value);
      } catch (error) {
        stop(cameraError(error), "error");
        return;
      }
      preview(state.stream);
      listCameras();  // labels are given once the camera is allowed
      pc = state.pc = await peerConnection();
      state.sender = pc.addTrack(state.stream.getVideoTracks()[0], state.stream);
      openChannel(pc);
      pc.ontrack = (event) => play(event.streams[0] || new MediaStream([event.track]), false);
      pc.onconnectionstatechange = () => {
        if (pc !== state.pc) return;
        if (pc.connectionState === "connected") status("streaming", "ok");
        if (["failed", "closed"].includes(pc.connectionState)) stop(`connection ${pc.connectionState}`, "error");
      };
      await pc.setLocalDescription(await pc.createOffer());
      await waitForIce(pc);
      if (pc !== state.pc) return;  // stopped meanwhile
      status("connecting…");
      const response = await fetch("offer", {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ sdp: pc.localDescription.sdp, type: pc.localDescription.type }),
      });
      const answer = await response.json().catch(() => ({}));
      if (pc !== state.pc) return;
      if (response.status === 503) {  // the server says why: every slot taken, or no room for one more
        stop(`server busy: ${answer.detail || "every stream slot is taken, try again soon"}`, "error");
        return;
      }
      if (!response.ok) { stop(answer.detail || answer.error || `error ${response.status}`, "error"); return; }
      state.closeUrl = answer.close || null;
      await pc.setRemoteDescription(answer);
    } catch (error) {
      if (pc === state.pc) stop(String(error.message || error), "error");
    }
  }

  function openChannel(pc) {
    const channel = (state.channel = pc.createDataChannel("control"));
    // what the controls say, one message per parameter: a refused one does not hold the others back
    channel.onopen = () => Object.entries(state.params).forEach(([field, value]) => send({ [field]: value }));
    channel.onmessage = (event) => {
      if (channel !== state.channel) return;  // already queued when Stop closed it
      const msg = JSON.parse(event.data);
      if (msg.type === "stats") showStats(msg);
      else answered(msg, state.lastSent);
    };
  }

  /** Free the server's slot at once (the tab may be going away: a beacon outlives the page). */
  function release() {
    if (state.closeUrl) navigator.sendBeacon(state.closeUrl);
    state.closeUrl = null;
  }

  function stop(reason = "stopped", kind = "info") {
    if (state.watching) { stopWatching(reason, kind); return; }
    release();
    state.pc?.close();
    state.stream?.getTracks().forEach((t) => t.stop());
    state.pc = state.channel = state.stream = state.sender = null;
    document.querySelectorAll(".diffcam-field-error").forEach((note) => { note.hidden = true; });
    preview(null);
    play(null, false);
    buttons(false);
    showStats(null);
    status(reason, kind);
  }

  function showStats(s) {
    const el = $("diffcam-stats");
    if (!el) return;
    if (!s) { el.textContent = state.idleStats; return; }
    const lat = s.latency_ms || {};
    el.textContent = `output ${s.output_fps.toFixed(1)} fps · latency p50 ${Math.round(lat.p50 || 0)} ms · ` +
      `dropped ${s.dropped} · skipped ${s.skipped} · errors ${s.errors}`;
  }

  function play(stream, remote) {
    const output = $("diffcam-output");
    if (output) output.srcObject = stream;
    $("diffcam-stage")?.classList.toggle("remote", remote);
  }

  // ---------------------------------------------------------------- live controls

  /** Put a listed stream's parameters (``GET /streams``) in the controls, so they show what it runs with.
   * Each control then reports its change, which steers the stream to the value it has already. */
  function showParams(params) {
    for (const [field, value] of Object.entries(params || {})) {
      const root = $(`diffcam-param-${field}`);
      if (!root) continue;  // strength: the stream says t_index_list, which the strength control does not show
      const text = Array.isArray(value) ? value.map((part) => part[0]).join(", ") : value;
      const input = root.querySelector("textarea, input[type=range], input[type=number], input[type=checkbox]");
      if (!input) continue;
      if (input.type === "checkbox") {
        if (input.checked !== Boolean(value)) input.click();
        continue;
      }
      input.value = String(text);
      input.dispatchEvent(new Event("input", { bubbles: true }));
      input.dispatchEvent(new Event("change", { bubbles: true }));
    }
  }

  /** Change parameters of what is playing (kept for the next Start as well). */
  function set(params) {
    Object.assign(state.params, params);
    if (state.watching) steer(params);
    else send(params);
  }

  function send(params) {
    if (!state.channel || state.channel.readyState !== "open") return;
    state.lastSent = Object.keys(params);
    state.channel.send(JSON.stringify(params));
  }

  /** A reply to a change: "applied" clears its controls' errors; "error" is shown beside the refused controls
   * (the reply's ``fields``, else the controls of the change it answers). The status is left as it is. */
  function answered(msg, sent) {
    if (msg.type === "applied") Object.keys(msg.params || {}).forEach((f) => fieldError(f, ""));
    if (msg.type !== "error") return;
    const fields = Array.isArray(msg.fields) ? msg.fields : sent;
    if (fields.length) fields.forEach((f) => fieldError(f, msg.error));
    else notice(msg.error);
  }

  function fieldError(field, text) {
    const block = $(`diffcam-param-${field}`);
    if (!block) { if (text) notice(`${field}: ${text}`); return; }
    let note = block.querySelector(":scope > .diffcam-field-error");
    if (!note) {
      note = document.createElement("div");
      note.className = "diffcam-field-error";
      note.setAttribute("role", "alert");
      block.appendChild(note);
    }
    note.textContent = text;
    note.hidden = !text;
    if (!text && !document.querySelector(".diffcam-field-error:not([hidden]):not(#diffcam-notice)")) notice("");
  }

  function notice(text) {
    const el = $("diffcam-notice");
    if (el) { el.textContent = text; el.hidden = !text; }
  }

  // ---------------------------------------------------------------- listed streams (WHIP, sources)

  async function pollStreams() {
    if (state.unlisted || document.visibilityState !== "visible") return;
    const response = await fetch("streams").catch(() => null);
    const body = response && response.ok ? await response.json().catch(() => null) : null;
    // 403: listing is not allowed here; 404 (or not JSON): a server without it
    if (response && (!response.ok ? [403, 404].includes(response.status) : !Array.isArray(body?.streams))) {
      unlist();
    }
    if (Array.isArray(body?.streams)) showStreams(body.streams);
  }

  /** This server lists no streams (to this page): stop asking, and hide the Stream picker. */
  function unlist() {
    state.unlisted = true;
    clearInterval(state.poller);
    if ($("diffcam-streams")) $("diffcam-streams").hidden = true;
  }

  function showStreams(streams) {
    const select = $("diffcam-stream");
    if (!select) return;
    const options = streams.map((s) => new Option(`${s.name || s.id} · ${s.viewers} watching`, s.id));
    const shown = options.map((o) => o.value + o.text).join();
    state.streams = streams;
    if (shown !== state.shownStreams) {  // rebuilt only on a change: an open list would close
      state.shownStreams = shown;
      const chosen = select.value;
      select.replaceChildren(new Option("my camera", ""), ...options);
      select.value = streams.some((s) => s.id === chosen) ? chosen : "";
    }
    $("diffcam-streams").hidden = false;
    // a player is not told when its stream ends: the list is
    if (state.watching && !streams.some((s) => s.id === state.watching.id)) ended();
  }

  /** Play what the Stream picker names: "" is my camera (press Start), anything else a listed stream. */
  function choose(id) {
    if (!id) {
      unwatch();
      status("press Start and allow the camera");
      return;
    }
    if (state.pc) stop();
    watch(id);
  }

  async function watch(id) {
    const listed = (state.streams || []).find((s) => s.id === id);
    unwatch(true);
    const watching = (state.watching = { id, pc: null, resource: null, listed });
    showViewLink(listed);
    showParams(listed && listed.params);
    $("diffcam-camera-row").hidden = true;
    buttons(true);
    status(`connecting to ${listed ? listed.name || id : id}…`);
    try {
      const pc = (watching.pc = await peerConnection());
      pc.addTransceiver("video", { direction: "recvonly" });
      pc.ontrack = (event) => play(new MediaStream([event.track]), true);
      pc.onconnectionstatechange = () => {
        if (state.watching !== watching) return;
        if (pc.connectionState === "connected") status(`watching ${listed ? listed.name || id : id}`, "ok");
        if (["failed", "closed"].includes(pc.connectionState)) {
          stopWatching(`the stream's connection ${pc.connectionState}`);
        }
      };
      await pc.setLocalDescription(await pc.createOffer());
      await waitForIce(pc);
      const response = await fetch(listed ? listed.whep : `whep/${encodeURIComponent(id)}`, {
        method: "POST", headers: { "Content-Type": "application/sdp" }, body: pc.localDescription.sdp,
      });
      if (state.watching !== watching) return;
      if (!response.ok) {
        if (response.status === 404) ended();
        else stopWatching((await response.text()).trim() || `error ${response.status}`, "error");
        return;
      }
      watching.resource = response.headers.get("Location");
      await pc.setRemoteDescription({ type: "answer", sdp: await response.text() });
    } catch (error) {
      if (state.watching === watching) stopWatching(String(error.message || error), "error");
    }
  }

  function stopWatching(reason, kind = "info") {
    unwatch(true);
    buttons(false);
    status(reason, kind);
  }

  function ended() {
    unwatch();
    status("that stream has ended: pick another, or press Start for your camera");
  }

  /** Stop playing a listed stream (the stream itself goes on); ``keep`` leaves it picked, to Start again. */
  function unwatch(keep = false) {
    const watching = state.watching;
    if (!watching) return;
    state.watching = keep ? { id: watching.id, listed: watching.listed } : null;
    if (watching.resource) fetch(watching.resource, { method: "DELETE", keepalive: true }).catch(() => {});
    watching.pc?.close();
    play(null, false);
    if (!keep) {
      if ($("diffcam-stream")) $("diffcam-stream").value = "";
      $("diffcam-camera-row").hidden = false;
      showViewLink(null);
      buttons(false);
    }
  }

  /** Send changes to the watched stream: one request at a time, one parameter each (a refused one does not
   * hold the others back), and of the changes made while one is out only each parameter's newest. */
  async function steer(params) {
    Object.assign(state.steer.pending, params);
    if (state.steer.busy) return;
    state.steer.busy = true;
    try {
      while (state.watching && Object.keys(state.steer.pending).length) {
        const [field] = Object.keys(state.steer.pending), id = state.watching.id;
        const body = { [field]: state.steer.pending[field] };
        delete state.steer.pending[field];
        const response = await fetch(`streams/${encodeURIComponent(id)}/params`, {
          method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
        }).catch(() => null);
        if (response && response.status === 429) {  // too fast: send the newest again shortly
          state.steer.pending = { ...body, ...state.steer.pending };
          await sleep(1000);
          continue;
        }
        if (response && response.status === 404) { ended(); break; }
        const reply = response ? await response.json().catch(() => ({}))
          : { type: "error", error: "no answer from the server" };
        answered(reply, Object.keys(body));
      }
    } finally {
      state.steer.busy = false;
    }
  }

  function showViewLink(listed) {
    const row = $("diffcam-view-link"), url = $("diffcam-view-url");
    if (!row || !url) return;
    row.hidden = !listed || !listed.view;
    url.value = listed && listed.view ? new URL(listed.view, location.href).href : "";
  }

  function copyViewLink() {
    const url = $("diffcam-view-url");
    if (!url) return;
    url.select();
    (navigator.clipboard?.writeText(url.value) || Promise.reject()).catch(() => document.execCommand("copy"));
  }

  // ---------------------------------------------------------------- wiring

  /** Run ``fn`` once the elements ``ids`` are on the page (Gradio renders them after this script runs). */
  function whenPresent(ids, fn) {
    const present = () => ids.every((id) => $(id));
    if (present()) { fn(); return; }
    const observer = new MutationObserver(() => { if (present()) { observer.disconnect(); fn(); } });
    observer.observe(document.documentElement, { childList: true, subtree: true });
  }

  function ready() {
    state.idleStats = $("diffcam-stats")?.textContent;  // what the stats say while nothing streams
    const problem = insecure();
    if (problem) status(problem, "error");
    else {
      listCameras().catch(() => {});
      navigator.mediaDevices.addEventListener?.("devicechange", () => listCameras().catch(() => {}));
    }
    clientConfig().then((config) => {
      if (config.streams_listed === false) { unlist(); return; }
      pollStreams();
      state.poller = setInterval(pollStreams, POLL_MS);
    });
  }

  const CLICKS = { "diffcam-start": start, "diffcam-stop": () => stop(), "diffcam-fullscreen": fullscreen,
                   "diffcam-copy": copyViewLink };
  document.addEventListener("click", (event) => CLICKS[event.target.id]?.());
  document.addEventListener("dblclick", (event) => { if (event.target.id === "diffcam-output") fullscreen(); });
  document.addEventListener("change", (event) => {
    const el = event.target;
    if (el.id === "diffcam-camera") switchCamera(el.value);
    if (el.id === "diffcam-stream") choose(el.value);
    if (el.id === "diffcam-mirror") mirror(el.checked);
    if (el.id === "diffcam-preview") showPreview(el.checked);
  });
  document.addEventListener("visibilitychange", () => { if (document.visibilityState === "visible") pollStreams(); });
  // a tab closed without Stop frees its slot now (a beacon), not when the server notices the camera stopped
  window.addEventListener("pagehide", () => stop());
  window.addEventListener("beforeunload", () => stop());
  whenPresent(["diffcam-status", "diffcam-stats"], ready);
  window.diffcam = { start, stop, set, listCameras, switchCamera, watch: choose, state };
})();
