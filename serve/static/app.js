// hci-atr search page: plain JS, no external libraries. ?q=words runs a text search on load (used by tests).
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const status = (msg, isError) => { $("status").textContent = msg; $("status").className = isError ? "error" : ""; };
  const tokenBox = $("token");
  tokenBox.value = sessionStorage.getItem("hci_atr_token") || "";
  tokenBox.addEventListener("change", () => sessionStorage.setItem("hci_atr_token", tokenBox.value));

  function authHeaders() {
    const t = tokenBox.value.trim();
    return t ? { Authorization: "Bearer " + t } : {};
  }

  function audioUrl(hit) {
    const t = tokenBox.value.trim();
    return hit.audio_url + (t ? "?token=" + encodeURIComponent(t) : "");
  }

  function render(data) {
    const list = $("results");
    list.textContent = "";
    for (const hit of data.hits) {
      const li = document.createElement("li");
      li.className = "hit";
      li.dataset.id = hit.id;
      li.dataset.score = String(hit.score);
      const head = document.createElement("div");
      const id = document.createElement("span");
      id.className = "id";
      id.textContent = hit.kind === "caption" ? hit.text : hit.id;
      const score = document.createElement("span");
      score.className = "score";
      score.textContent = "score " + hit.score.toFixed(4) + " (clip " + hit.clip_score.toFixed(4) + ")";
      head.append(id, score);
      li.append(head);
      const caps = document.createElement("div");
      caps.className = "caps";
      if (hit.kind === "caption") {
        caps.textContent = "clip " + hit.id + " \u00b7 " + hit.source + " caption";
      } else {
        const parts = (hit.captions || []).slice(0, 2);
        if (hit.generated_caption) parts.push("generated: " + hit.generated_caption);
        caps.textContent = parts.join(" | ");
      }
      li.append(caps);
      const audio = document.createElement("audio");
      audio.controls = true;
      audio.preload = "none";
      audio.src = audioUrl(hit);
      li.append(audio);
      list.append(li);
    }
    const t = data.timings || {};
    status(data.hits.length + " results" + (data.reranked ? " (reranked)" : "") +
           " \u00b7 encode " + (t.encode_ms || 0).toFixed(1) + " ms, retrieve " + (t.retrieve_ms || 0).toFixed(1) +
           " ms, rerank " + (t.rerank_ms || 0).toFixed(1) + " ms", false);
    document.body.dataset.state = "done";
  }

  // Serve's own proxy answers overload (503) and timeouts (408) in plain text, not the app's {"error": ...} JSON
  function failure(status, data) {
    if (status === 503 || status === 429) return "busy, try again";
    if (status === 408 || status === 504) return "timed out, try again";
    return "error: " + ((data && data.error) || ("HTTP " + status));
  }

  async function call(url, options) {
    document.body.dataset.state = "loading";
    status("searching\u2026", false);
    try {
      const resp = await fetch(url, options);
      const text = await resp.text();
      let data = null;
      try { data = JSON.parse(text); } catch (e) { data = null; }
      if (!resp.ok || data === null) {
        $("results").textContent = "";
        status(resp.ok ? "error: the server sent no JSON" : failure(resp.status, data), true);
        document.body.dataset.state = "error";
        return;
      }
      render(data);
    } catch (err) {
      $("results").textContent = "";
      status("error: " + err.message, true);
      document.body.dataset.state = "error";
    }
  }

  function searchText() {
    const query = $("q").value;
    const topK = parseInt($("k").value, 10) || 10;
    return call("/search/text", {
      method: "POST",
      headers: Object.assign({ "Content-Type": "application/json" }, authHeaders()),
      body: JSON.stringify({ query: query, top_k: topK, rerank: $("rerank").checked }),
    });
  }

  $("text-form").addEventListener("submit", (e) => { e.preventDefault(); searchText(); });
  $("audio-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const f = $("file").files[0];
    if (!f) { status("choose an audio file first", true); return; }
    const form = new FormData();
    form.append("file", f);
    form.append("top_k", String(parseInt($("k").value, 10) || 10));
    form.append("target", $("target").value);
    call("/search/audio", { method: "POST", headers: authHeaders(), body: form });
  });

  const params = new URLSearchParams(window.location.search);
  if (params.get("k")) $("k").value = params.get("k");
  if (params.get("q")) { $("q").value = params.get("q"); searchText(); }
})();
