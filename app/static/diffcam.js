// diffcam page client: camera → WebRTC → /offer → stylized video back; controls over a data channel.
(() => {
  const state = { pc: null, channel: null, stream: null, params: {} };
  const $ = (id) => document.getElementById(id);

  function status(text, kind = "info") {
    const el = $("diffcam-status");
    if (el) { el.textContent = text; el.dataset.kind = kind; }
  }

  async function listCameras() {
    const select = $("diffcam-camera");
    if (!select || !navigator.mediaDevices) return;
    const devices = (await navigator.mediaDevices.enumerateDevices()).filter((d) => d.kind === "videoinput");
    const chosen = select.value;
    select.innerHTML = "";
    devices.forEach((d, i) => {
      const option = document.createElement("option");
      option.value = d.deviceId;
      option.textContent = d.label || `camera ${i + 1}`;
      select.appendChild(option);
    });
    if (chosen) select.value = chosen;
  }

  function waitForIce(pc) {
    if (pc.iceGatheringState === "complete") return Promise.resolve();
    return new Promise((resolve) => {
      const done = () => { if (pc.iceGatheringState === "complete") { pc.removeEventListener("icegatheringstatechange", done); resolve(); } };
      pc.addEventListener("icegatheringstatechange", done);
      setTimeout(resolve, 3000);  // answer with what we have rather than hang
    });
  }

  function showStats(s) {
    const el = $("diffcam-stats");
    if (!el) return;
    const lat = s.latency_ms || {};
    el.textContent = `output ${s.output_fps.toFixed(1)} fps · latency p50 ${Math.round(lat.p50 || 0)} ms · ` +
      `dropped ${s.dropped} · skipped ${s.skipped} · errors ${s.errors}`;
  }

  async function start() {
    if (state.pc) return;
    try {
      status("asking for the camera…");
      const select = $("diffcam-camera");
      const deviceId = select && select.value ? { exact: select.value } : undefined;
      state.stream = await navigator.mediaDevices.getUserMedia({ video: { deviceId, width: 640, height: 480 }, audio: false });
      $("diffcam-local").srcObject = state.stream;
      listCameras();
      const pc = (state.pc = new RTCPeerConnection());
      state.stream.getVideoTracks().forEach((t) => pc.addTrack(t, state.stream));
      const channel = (state.channel = pc.createDataChannel("control"));
      channel.onopen = () => { if (Object.keys(state.params).length) channel.send(JSON.stringify(state.params)); };
      channel.onmessage = (event) => {
        const msg = JSON.parse(event.data);
        if (msg.type === "stats") showStats(msg);
        else if (msg.type === "error") status(msg.error, "error");
      };
      pc.ontrack = (event) => { $("diffcam-output").srcObject = event.streams[0] || new MediaStream([event.track]); };
      pc.onconnectionstatechange = () => {
        if (pc.connectionState === "connected") status("streaming", "ok");
        if (["failed", "closed"].includes(pc.connectionState)) stop(`connection ${pc.connectionState}`);
      };
      await pc.setLocalDescription(await pc.createOffer());
      await waitForIce(pc);
      status("connecting…");
      const response = await fetch("offer", {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ sdp: pc.localDescription.sdp, type: pc.localDescription.type }),
      });
      const answer = await response.json();
      if (response.status === 503) { stop("server busy: every stream slot is taken, try again soon", "error"); return; }
      if (!response.ok) { stop(answer.detail || answer.error || `error ${response.status}`, "error"); return; }
      await pc.setRemoteDescription(answer);
      $("diffcam-start").disabled = true;
      $("diffcam-stop").disabled = false;
    } catch (error) {
      stop(String(error.message || error), "error");
    }
  }

  function stop(reason = "stopped", kind = "info") {
    if (state.pc) state.pc.close();
    if (state.stream) state.stream.getTracks().forEach((t) => t.stop());
    state.pc = state.channel = state.stream = null;
    const start = $("diffcam-start"), stopButton = $("diffcam-stop");
    if (start) start.disabled = false;
    if (stopButton) stopButton.disabled = true;
    status(reason, kind);
  }

  function set(params) {
    Object.assign(state.params, params);
    if (state.channel && state.channel.readyState === "open") state.channel.send(JSON.stringify(params));
  }

  document.addEventListener("click", (event) => {
    if (event.target.id === "diffcam-start") start();
    if (event.target.id === "diffcam-stop") stop();
  });
  window.addEventListener("load", () => listCameras().catch(() => {}));
  window.diffcam = { start, stop, set, listCameras, state };
})();
