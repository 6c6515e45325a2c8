// The page of `mmfs-fast serve`: every render is a POST /v1/stylize to this same service.
"use strict";

const TOKEN_KEY = "mmfs_fast.token"; // sessionStorage: this tab only, never in the URL
const GRID_SIZE = 6;
const GRID_IN_FLIGHT = 2;
const $ = (id) => document.getElementById(id);

class ServiceError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

const state = { image: null, resultUrl: null, gridUrls: [], tokenPrompt: null };

// -- the service -----------------------------------------------------------------------------

async function errorMessage(response) {
  try {
    const body = await response.json();
    if (typeof body.error === "string") return body.error;
  } catch (_) { /* not the service's JSON error */ }
  return response.statusText || "request failed";
}

function renderTime(response) {
  const match = /render;dur=([\d.]+)/.exec(response.headers.get("Server-Timing") || "");
  return match ? Number(match[1]) : null;
}

function askToken(message) {
  // one prompt at a time: simultaneous 401s (the grid) wait for the same answer
  if (!state.tokenPrompt) {
    state.tokenPrompt = new Promise((resolve) => {
      const dialog = $("token-dialog"), form = $("token-form"), input = $("token"), error = $("token-error");
      error.textContent = message;
      error.hidden = !message;
      input.value = "";
      const finish = (token) => {
        form.onsubmit = $("token-cancel").onclick = dialog.oncancel = null;
        dialog.close();
        state.tokenPrompt = null;
        resolve(token);
      };
      form.onsubmit = (event) => { event.preventDefault(); finish(input.value.trim() || null); };
      $("token-cancel").onclick = () => finish(null);
      dialog.oncancel = (event) => { event.preventDefault(); finish(null); };
      dialog.showModal();
      input.focus();
    });
  }
  return state.tokenPrompt;
}

async function stylize(fields) {
  for (;;) {
    const body = new FormData();
    for (const [name, value] of Object.entries(fields)) body.append(name, value);
    const token = sessionStorage.getItem(TOKEN_KEY);
    const response = await fetch("/v1/stylize", {
      method: "POST", body, headers: token ? { Authorization: `Bearer ${token}` } : {},
    });
    if (response.status === 401) {
      const message = await errorMessage(response);
      if (sessionStorage.getItem(TOKEN_KEY) !== token) continue; // a token was entered meanwhile
      sessionStorage.removeItem(TOKEN_KEY);
      const given = await askToken(token ? message : ""); // a token was sent: it was wrong
      if (!given) throw new ServiceError(401, message);
      sessionStorage.setItem(TOKEN_KEY, given);
      continue;
    }
    if (!response.ok) throw new ServiceError(response.status, await errorMessage(response));
    return { blob: await response.blob(), ms: renderTime(response), faces: response.headers.get("X-Faces") };
  }
}

async function watchReadiness() {
  const pill = $("status");
  for (;;) {
    try {
      const response = await fetch("/readyz");
      if (response.ok) {
        pill.textContent = "ready";
        pill.className = "pill ready";
        return;
      }
      pill.textContent = (await errorMessage(response)) || "warming up";
    } catch (_) {
      pill.textContent = "service unreachable";
    }
    pill.className = "pill";
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
}

// -- the form --------------------------------------------------------------------------------

function styleKind() {
  return document.querySelector('input[name="style"]:checked').value;
}

function requestFields(seed) {
  if (!state.image) throw new ServiceError(null, "choose an image first");
  const fields = { image: state.image };
  const kind = styleKind();
  if (kind === "seed") fields.seed = seed ?? $("seed").value.trim();
  else if (kind === "text") fields.text = $("text").value;
  else {
    const reference = $("reference").files[0];
    if (!reference) throw new ServiceError(null, "choose a reference image first");
    fields.reference = reference;
  }
  if ($("mix").checked) { // MMFS.mix on the service: coarse slots from the style, fine ones from the second seed
    fields.mix_seed = $("mix-seed").value.trim();
    fields.crossover = $("crossover").value;
  }
  if ($("random-noise").checked) fields.noise = "random";
  if ($("align").checked) {
    fields.align = "true";
    if ($("paste-back").checked) fields.paste_back = "true";
  }
  return fields;
}

function downloadName(fields) {
  const style = fields.seed !== undefined ? `seed${fields.seed}` : fields.text !== undefined ? "text" : "reference";
  const mix = fields.crossover !== undefined ? `_mix${fields.mix_seed}at${fields.crossover}` : "";
  return `mmfs_fast_${style}${mix}.png`;
}

function setImage(file) {
  state.image = file;
  const view = $("input-view");
  if (view.src) URL.revokeObjectURL(view.src);
  view.src = URL.createObjectURL(file);
  view.hidden = false;
  $("drop-hint").hidden = true;
  view.onerror = () => { // not an image the browser shows: the service will say what it is
    view.hidden = true;
    $("drop-hint").hidden = false;
    $("drop-hint").textContent = file.name;
  };
}

// -- showing results -------------------------------------------------------------------------

function setBusy(busy) {
  $("stage").setAttribute("aria-busy", String(busy));
  $("render").disabled = busy;
  $("shuffle").disabled = busy || styleKind() !== "seed";
  if (busy) $("timing").textContent = "Rendering…";
}

function showError(error) {
  const box = $("error");
  box.textContent = error.status ? `${error.status} · ${error.message}` : error.message;
  box.hidden = false;
  box.scrollIntoView({ block: "nearest" }); // one column on a phone: the message is below the buttons
  $("timing").textContent = "";
}

function describe(result) {
  const parts = [];
  if (result.ms !== null) parts.push(`${formatMs(result.ms)} per image on the service`);
  if (result.faces) parts.push(`${result.faces} face${result.faces === "1" ? "" : "s"}`);
  return parts.join(" · ");
}

function formatMs(ms) {
  return ms >= 1000 ? `${(ms / 1000).toFixed(2)} s` : `${Math.round(ms)} ms`;
}

function showResult(blob, name, text) {
  if (state.resultUrl && !state.gridUrls.includes(state.resultUrl)) URL.revokeObjectURL(state.resultUrl);
  state.resultUrl = URL.createObjectURL(blob);
  const img = $("result");
  img.src = state.resultUrl;
  img.hidden = false;
  $("result-hint").hidden = true;
  $("result-button").disabled = false;
  const link = $("download");
  link.href = state.resultUrl;
  link.download = name;
  link.hidden = false;
  $("timing").textContent = text;
  $("result-button").scrollIntoView({ block: "nearest" });
}

function clearGrid() {
  for (const url of state.gridUrls) if (url !== state.resultUrl) URL.revokeObjectURL(url);
  state.gridUrls = [];
  $("grid").replaceChildren();
}

async function render() {
  $("error").hidden = true;
  let fields;
  try {
    fields = requestFields();
  } catch (error) {
    return showError(error);
  }
  setBusy(true);
  try {
    const result = await stylize(fields);
    clearGrid();
    showResult(result.blob, downloadName(fields), describe(result));
  } catch (error) {
    showError(error);
  } finally {
    setBusy(false);
  }
}

async function shuffle() {
  $("error").hidden = true;
  const seeds = new Set(); // short numbers are easier to note down
  while (seeds.size < GRID_SIZE) seeds.add(crypto.getRandomValues(new Uint32Array(1))[0] % 1000000);
  let fieldsOf;
  try {
    fieldsOf = [...seeds].map((seed) => requestFields(String(seed)));
  } catch (error) {
    return showError(error);
  }
  setBusy(true);
  clearGrid();
  const tiles = fieldsOf.map(addTile);
  const started = performance.now(), times = [];
  let next = 0, failed = false;
  const progress = () => { $("timing").textContent = `Rendering ${times.length}/${GRID_SIZE}…`; };
  // a few requests in flight: tiles appear as they finish, and no request waits behind
  // the whole grid (a CPU takes seconds per 512² image; the service times out at 30 s)
  async function renderTiles() {
    while (next < fieldsOf.length && !failed) {
      const i = next++;
      try {
        const result = await stylize(fieldsOf[i]);
        fillTile(tiles[i], result, fieldsOf[i]);
        times.push(result.ms);
        progress();
      } catch (error) {
        failed = true;
        throw error;
      }
    }
  }
  progress();
  try {
    await Promise.all(Array.from({ length: GRID_IN_FLIGHT }, renderTiles));
    const known = times.filter((ms) => ms !== null).sort((a, b) => a - b);
    const perImage = known[Math.floor(known.length / 2)]; // the median
    $("timing").textContent = `${GRID_SIZE} seeds in ${formatMs(performance.now() - started)}` +
      (perImage !== undefined ? ` · ${formatMs(perImage)} per image on the service` : "") + " · pick one";
  } catch (error) {
    showError(error);
  } finally {
    setBusy(false);
  }
}

function addTile(fields) {
  const tile = document.createElement("button");
  tile.type = "button";
  tile.className = "tile";
  tile.disabled = true;
  tile.dataset.seed = fields.seed;
  tile.title = `use seed ${fields.seed}`;
  const img = document.createElement("img");
  img.alt = `seed ${fields.seed}`;
  img.hidden = true;
  const thumb = document.createElement("span");
  thumb.className = "thumb";
  const caption = document.createElement("span");
  caption.textContent = `seed ${fields.seed}`;
  thumb.append(img);
  tile.append(thumb, caption);
  $("grid").append(tile);
  return tile;
}

function fillTile(tile, result, fields) {
  const url = URL.createObjectURL(result.blob);
  state.gridUrls.push(url);
  const img = tile.querySelector("img");
  img.src = url;
  img.hidden = false;
  tile.disabled = false;
  tile.classList.add("done");
  tile.onclick = () => {
    $("seed").value = fields.seed;
    for (const other of $("grid").children) other.classList.toggle("picked", other === tile);
    showResult(result.blob, downloadName(fields), describe(result));
  };
}

// -- wiring ----------------------------------------------------------------------------------

function wire() {
  $("grid-count").textContent = GRID_SIZE;
  $("image").onchange = (event) => event.target.files[0] && setImage(event.target.files[0]);
  const drop = $("drop");
  drop.ondragover = (event) => { event.preventDefault(); drop.classList.add("over"); };
  drop.ondragleave = () => drop.classList.remove("over");
  drop.ondrop = (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    if (event.dataTransfer.files[0]) setImage(event.dataTransfer.files[0]);
  };
  $("align").onchange = () => {
    const on = $("align").checked;
    $("paste-back").disabled = !on;
    if (!on) $("paste-back").checked = false;
    $("align-hint").textContent = on ? "Every face found is aligned and stylized." :
      "Off: the image is an aligned face crop.";
  };
  for (const radio of document.querySelectorAll('input[name="style"]')) {
    radio.onchange = () => {
      for (const panel of document.querySelectorAll(".panel")) panel.hidden = panel.dataset.style !== styleKind();
      $("shuffle").disabled = styleKind() !== "seed";
    };
  }
  $("mix").onchange = () => { $("mix-panel").hidden = !$("mix").checked; };
  $("crossover").oninput = () => { $("crossover-value").textContent = $("crossover").value; };
  $("render").onclick = render;
  $("shuffle").onclick = shuffle;
  $("result-button").onclick = () => {
    $("viewer-image").src = state.resultUrl;
    $("viewer").showModal();
  };
  $("viewer-close").onclick = () => $("viewer").close();
  $("viewer").onclick = (event) => event.target === $("viewer") && $("viewer").close();
  watchReadiness();
}

wire();
