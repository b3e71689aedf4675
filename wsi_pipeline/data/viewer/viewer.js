// wsi-triage viewer: the slide (deep zoom), the suspicion overlay, tile outlines and the top-k list.
"use strict";
(function () {
  const MAX_OUTLINES = 1500;  // drawn highest suspicion first; more would slow the page
  const $ = (id) => document.getElementById(id);
  const state = { viewer: null, id: null, data: null, overlay: null, outlines: [], focus: null, ready: false };
  window.wsiViewer = state;  // for the browser test and the curious

  function fmt(v) { return v === null || v === undefined ? "\u2013" : Number(v).toFixed(3); }
  function rect(x, y, w, h) {  // image px -> viewport units (the slide is 1 wide)
    const W = state.data.width;
    return new OpenSeadragon.Rect(x / W, y / W, w / W, h / W);
  }
  function floor() { return Number($("floor").value); }
  function opacity() { return $("show-overlay").checked ? Number($("opacity").value) : 0; }

  function setOverlay() {
    const v = state.viewer, d = state.data;
    if (state.overlay) { v.world.removeItem(state.overlay); state.overlay = null; }
    if (!d || !d.overlay) return;
    const o = d.overlay, W = d.width, id = state.id;
    v.addTiledImage({
      tileSource: { type: "image", url: `/overlay/${id}.png?floor=${floor()}`, buildPyramid: false },
      x: o.x / W, y: o.y / W, width: o.width / W, opacity: opacity(), index: 1,
      success: (e) => {
        if (state.id !== id) { v.world.removeItem(e.item); return; }
        if (state.overlay && state.overlay !== e.item) v.world.removeItem(state.overlay);
        state.overlay = e.item;
      },
    });
  }

  function drawOutlines() {
    const v = state.viewer;
    for (const el of state.outlines) v.removeOverlay(el);
    state.outlines = [];
    if (!state.data || !$("show-outlines").checked) return;
    const f = floor();
    const tiles = state.data.tiles.filter((t) => t[4] >= f).sort((a, b) => b[4] - a[4]).slice(0, MAX_OUTLINES);
    for (const t of tiles) {
      const el = document.createElement("div");
      el.className = "outline";
      el.style.borderColor = t[5];
      el.title = `suspicion ${t[4].toFixed(3)}`;
      v.addOverlay({ element: el, location: rect(t[0], t[1], t[2], t[3]) });
      state.outlines.push(el);
    }
  }

  function legendFloor() {
    $("legend-floor").style.width = `${floor() * 100}%`;
    $("floor-value").textContent = floor().toFixed(2);
    $("opacity-value").textContent = Number($("opacity").value).toFixed(2);
  }

  function flyTo(t, li) {
    const pad = 2 * Math.max(t.w, t.h);
    state.viewer.viewport.fitBounds(rect(t.x - pad, t.y - pad, t.w + 2 * pad, t.h + 2 * pad));
    if (state.focus) state.viewer.removeOverlay(state.focus);
    const el = document.createElement("div");
    el.className = "outline focus";
    state.viewer.addOverlay({ element: el, location: rect(t.x, t.y, t.w, t.h) });
    state.focus = el;
    for (const other of $("topk").children) other.classList.toggle("active", other === li);
  }

  function renderTopK() {
    const ol = $("topk");
    ol.replaceChildren();
    for (const t of state.data.top_tiles) {
      const li = document.createElement("li");
      li.dataset.x = t.x; li.dataset.y = t.y; li.dataset.w = t.w; li.dataset.h = t.h;
      li.textContent = `${fmt(t.suspicion)} ${t.argmax} at x ${t.x}, y ${t.y}`;
      li.addEventListener("click", () => flyTo(t, li));
      ol.appendChild(li);
    }
    if (!state.data.top_tiles.length) ol.innerHTML = '<span class="muted">none</span>';
  }

  async function openSlide(id) {
    state.ready = false;
    state.id = id;
    const response = await fetch(`/api/slide/${id}.json`);
    if (!response.ok) { $("slide-score").textContent = await response.text(); return; }
    const d = await response.json();
    if (state.id !== id) return;
    state.data = d;
    state.overlay = null; state.outlines = []; state.focus = null;
    $("slide-title").textContent = d.name;
    $("slide-score").textContent = d.score === null || d.score === undefined ? "not scored"
      : `slide score ${fmt(d.score)} (${d.method}), ${d.tiles.length} tiles`;
    $("no-scores").hidden = !!d.overlay;
    for (const li of $("slides").children) li.classList.toggle("active", Number(li.dataset.id) === id);
    state.viewer.addOnceHandler("open", () => {
      setOverlay(); drawOutlines(); renderTopK();
      state.ready = true;
    });
    state.viewer.open(`/slide/${id}.dzi`);
  }

  function renderSlides(list) {
    const ol = $("slides");
    for (const s of list.slides) {
      const li = document.createElement("li");
      li.dataset.id = s.id;
      li.className = s.status;
      li.style.color = list.status_colours[s.status] || "";
      li.textContent = `${s.name}  ${fmt(s.score)}  ${s.status}`;
      if (s.error) {
        const err = document.createElement("span");
        err.className = "err"; err.textContent = s.error;
        li.appendChild(err);
      } else {
        li.addEventListener("click", () => openSlide(s.id));
      }
      ol.appendChild(li);
    }
    $("slides-section").hidden = list.slides.length < 2;
  }

  async function init() {
    const list = await (await fetch("/api/slides.json")).json();
    const stops = list.legend.map((c, i) => `${c} ${(100 * i) / (list.legend.length - 1)}%`).join(",");
    $("legend-bar").style.background = `linear-gradient(to right, ${stops})`;
    renderSlides(list);
    state.viewer = OpenSeadragon({
      id: "osd", prefixUrl: "/static/images/", showNavigator: true, navigatorPosition: "BOTTOM_RIGHT",
      maxZoomPixelRatio: 4, visibilityRatio: 0.5, animationTime: 0.6, timeout: 60000, maxTilesPerFrame: 4,
    });
    let timer = null;
    $("floor").addEventListener("input", () => {
      legendFloor(); drawOutlines();
      clearTimeout(timer); timer = setTimeout(setOverlay, 150);
    });
    const setOpacity = () => { legendFloor(); if (state.overlay) state.overlay.setOpacity(opacity()); };
    $("opacity").addEventListener("input", setOpacity);
    $("show-overlay").addEventListener("change", setOpacity);
    $("show-outlines").addEventListener("change", drawOutlines);
    legendFloor();
    const first = list.slides.find((s) => !s.error);
    if (first) openSlide(first.id);
    else $("slide-score").textContent = "no slide can be shown";
  }
  init();
})();
