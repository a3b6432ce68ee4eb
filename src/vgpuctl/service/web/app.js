// vgpuctl dashboard: the overview (index.html) and a VM's page (vm.html). Plain ES module, no build step.
//
// Data: the REST API under api/v1/ for the first paint and on demand, then server-sent events
// (api/v1/events: "gpus", "vgpus", "vms", "vfs", each a whole snapshot) keep every section live.

import { DisplayPlayer, displayUrl } from "./display.js";

const API = "api/v1/";
const THUMB_EVERY_MS = 2000;

// ====================================================================== helpers

/** An element: h("button", {class: "x", onclick: f}, "text", child, ...). */
function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key === "style" && typeof value === "object") Object.assign(node.style, value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  append(node, children);
  return node;
}

function append(node, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

function replace(node, ...children) {
  node.replaceChildren();
  append(node, children);
}

const $ = (id) => document.getElementById(id);

function toLogin() {
  const here = location.pathname + location.search + location.hash;
  location.assign(`login?next=${encodeURIComponent(here)}`);
}

class ApiError extends Error {}

/** fetch() under api/v1/: a 401 goes to the login page, any other failure throws with the server's message. */
async function api(path, options = {}) {
  let response;
  try {
    response = await fetch(API + path, { credentials: "same-origin", ...options });
  } catch (err) {
    throw new ApiError(`the vgpuctl service cannot be reached (${err.message})`);
  }
  if (response.status === 401) {
    toLogin();
    throw new ApiError("not logged in");
  }
  if (!response.ok) throw new ApiError(await errorText(response));
  return response;
}

async function errorText(response) {
  const text = await response.text();
  try {
    const data = JSON.parse(text);
    // The service answers {"error": kind, "message": what to do}; request validation adds "detail".
    const detail = data.message ?? data.detail ?? data.error ?? text;
    if (typeof detail === "string") return detail;
    if (Array.isArray(detail)) return detail.map((d) => d.msg || JSON.stringify(d)).join("; ");
    return JSON.stringify(detail);
  } catch (err) {
    return text || `${response.status} ${response.statusText}`;
  }
}

const apiJson = async (path) => (await api(path)).json();

function announce(text) {
  const region = $("announce");
  if (region) region.textContent = text;
}

function shortUuid(uuid) {
  return uuid ? uuid.slice(0, 8) : "";
}

const UUID_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

/** The UUID of the vGPU a VM runs on ("vgpu_uuid"; "vgpu" is the spec's request in the VM listing). */
function vgpuUuidOf(vm) {
  if (vm.vgpu_uuid) return vm.vgpu_uuid;
  return typeof vm.vgpu === "string" && UUID_RE.test(vm.vgpu) ? vm.vgpu : null;
}

/** What the VM's spec asks for as its vGPU, when the listing says ("vgpu" that is not a UUID). */
function vgpuRequestOf(vm) {
  return typeof vm.vgpu === "string" && !UUID_RE.test(vm.vgpu) ? vm.vgpu : null;
}

const PALETTE = ["#2f6fdf", "#e0803a", "#2e9d63", "#c2417a", "#7b52c9", "#1f9fb0", "#b89a1c", "#d0473b",
  "#4b8a2f", "#8a5a3c", "#5b6fd6", "#c06bc9"];

/** A colour per vGPU, the same in every bar, the legend and the list, and kept for the page's life: each new
 * vGPU takes the colour fewest vGPUs have now (so up to 12 side by side never share one). */
const colours = new Map();

function colourOf(uuid) {
  let colour = colours.get(uuid);
  if (!colour) {
    const uses = new Map(PALETTE.map((c) => [c, 0]));
    for (const c of colours.values()) uses.set(c, uses.get(c) + 1);
    colour = PALETTE.reduce((best, c) => (uses.get(c) < uses.get(best) ? c : best), PALETTE[0]);
    colours.set(uuid, colour);
  }
  return colour;
}

/** Forget the colours of vGPUs that are gone, and give new ones theirs in a stable (sorted) order. */
function assignColours(uuids) {
  const present = new Set(uuids);
  for (const uuid of colours.keys()) if (!present.has(uuid)) colours.delete(uuid);
  for (const uuid of [...present].sort()) colourOf(uuid);
}

function fmtNumber(value) {
  return typeof value === "number" ? value.toLocaleString("en") : String(value ?? "?");
}

// ====================================================================== live updates

/**
 * Subscribes to api/v1/events. handlers: {gpus(rows), vgpus(rows), vms(rows)}.
 * The indicator #live says whether the page is live; EventSource reconnects by itself, and when the
 * server refused the stream (e.g. the session expired) we check the login and try again.
 */
function subscribe(handlers) {
  const live = $("live");
  const show = (state, text) => {
    live.dataset.state = state;
    live.textContent = text;
  };
  let source = null;
  let retry = null;
  const open = () => {
    clearTimeout(retry);
    source = new EventSource(API + "events", { withCredentials: true });
    for (const [name, handler] of Object.entries(handlers)) {
      source.addEventListener(name, (event) => {
        show("live", "live");
        try {
          handler(JSON.parse(event.data));
        } catch (err) {
          console.error(`event ${name}:`, err);
        }
      });
    }
    source.onopen = () => show("live", "live");
    source.onerror = (event) => {
      if (event.data) {  // the server's own "error" event: a snapshot could not be read (the last one stays)
        try {
          const data = JSON.parse(event.data);
          show("connecting", `live, but ${data.source || "a listing"} failed: ${data.message}`);
        } catch (err) { /* not JSON */ }
        return;
      }
      if (source.readyState === EventSource.CLOSED) {
        show("down", "disconnected");
        api("gpus").then(() => { retry = setTimeout(open, 3000); }, () => { retry = setTimeout(open, 5000); });
      } else {
        show("connecting", "reconnecting…");
      }
    };
  };
  open();
  addEventListener("pagehide", () => source && source.close());
  addEventListener("pageshow", (event) => { if (event.persisted) open(); });  // back from the back/forward cache
}

// ====================================================================== VM actions (both pages)

const ACTIONS = {
  start: { label: "Start", busy: "starting", cls: "primary" },
  stop: { label: "Stop", busy: "stopping", cls: "" },
  kill: { label: "Kill", busy: "killing", cls: "danger" },
};

const RUNNING_STATES = new Set(["running", "paused", "shutdown"]);

function allowed(action, state) {
  if (action === "start") return !RUNNING_STATES.has(state);
  return RUNNING_STATES.has(state);
}

const EXPECT_MS = 3000;
const expected = new Map();  // VM name -> {status, until}: what a start/stop/kill answered, until the listing agrees

/** Start, stop or kill a VM; what the service answers (the VM's status) shows at once, even before the
 * event stream's next snapshot, which may have been read while the action ran. */
async function vmAction(name, action, onSettled) {
  const response = await api(`vms/${encodeURIComponent(name)}/${action}`, { method: "POST" });
  let status = null;
  try {
    status = await response.json();
  } catch (err) { /* no body */ }
  if (status && typeof status.state === "string") {
    const { name: _name, vgpu, ...rest } = status;
    expected.set(name, { status: { ...rest, vgpu_uuid: vgpu ?? null }, until: Date.now() + EXPECT_MS });
    setTimeout(onSettled, EXPECT_MS + 50);
  }
  return status;
}

/** The VM row as the page shows it: the listing's, unless an action just answered otherwise. */
function current(vm) {
  const hold = expected.get(vm.name);
  if (!hold) return vm;
  if (hold.status.state === vm.state || Date.now() > hold.until) {
    expected.delete(vm.name);
    return vm;
  }
  return { ...vm, ...hold.status };
}

// ====================================================================== overview

function overview() {
  const data = { gpus: null, vgpus: null, vms: null, types: null, vfs: null };
  const fromEvents = new Set();  // kinds the event stream has sent: newer than any first fetch
  const busy = new Map();        // VM name -> action in progress
  const errors = new Map();      // VM name -> last action's error
  const cards = new Map();       // VM name -> its card's parts, kept across updates (thumbnails, focus)

  // ---------------------------------------------------------------- types follow the vGPUs

  let typesTimer = null;
  let typesLoading = false;
  const reloadTypes = () => {
    clearTimeout(typesTimer);
    typesTimer = setTimeout(async () => {
      if (typesLoading) {
        reloadTypes();
        return;
      }
      typesLoading = true;
      try {
        data.types = await apiJson("types");
        renderTypes();
        renderGpus();
      } catch (err) {
        console.warn("types:", err);
      } finally {
        typesLoading = false;
      }
    }, 80);
  };

  let rawVms = [];
  /** The VMs again, with what actions answered (see current()); and what shows them. */
  const refreshVms = () => {
    data.vms = rawVms.map(current);
    renderVms();
    renderVgpus();
    renderGpus();
  };

  const apply = (kind, rows, viaEvents) => {
    if (!viaEvents && fromEvents.has(kind)) return;
    if (viaEvents) fromEvents.add(kind);
    if (kind === "vms") rawVms = rows;
    data[kind] = kind === "vms" ? rows.map(current) : rows;
    if (kind === "vgpus") assignColours(rows.map((v) => v.uuid));
    if (kind === "gpus") {
      renderGpus();
      if (!rows.length && !doctorRan) runDoctor();  // no GPU to show: say why at once
    }
    if (kind === "vgpus") {
      renderVgpus();
      renderGpus();
    }
    if (kind === "vms") {
      renderVms();
      renderVgpus();
      renderGpus();
      renderVfs();
    }
    if (kind === "vfs") renderVfs();
    if (viaEvents && (kind === "gpus" || kind === "vgpus" || kind === "vfs")) reloadTypes();
  };

  // ---------------------------------------------------------------- lookups

  /** vGPU UUID -> the VM on it: the VM running on it, else a stopped VM that keeps it for its next start
   * ("vgpu_reserved", when the service says). */
  const vmOfVgpu = () => {
    const found = new Map();
    for (const vm of data.vms || []) {
      const uuid = vgpuUuidOf(vm);
      if (uuid && !found.has(uuid)) found.set(uuid, vm);
    }
    for (const vm of data.vms || []) {
      if (vm.vgpu_reserved && !found.has(vm.vgpu_reserved)) found.set(vm.vgpu_reserved, vm);
    }
    return found;
  };

  const typeOf = (parent, typeId) => (data.types || []).find((t) => t.parent === parent && t.type === typeId);

  const vgpuRow = (uuid) => (data.vgpus || []).find((v) => v.uuid === uuid);

  /** What one vGPU of a type takes from a pool, from the type's fields (null: not known). */
  const share = (poolName, type) => {
    if (/id|slot/i.test(poolName)) return 1;
    const fields = type && type.fields;
    if (!fields) return null;
    if (/low/i.test(poolName)) return fields.low_gm_mib ?? null;
    if (/high/i.test(poolName)) return fields.high_gm_mib ?? null;
    if (/fence/i.test(poolName)) return fields.fences ?? null;
    return null;
  };

  // ---------------------------------------------------------------- GPUs

  const renderGpus = () => {
    const body = $("gpus-body");
    if (!data.gpus) return;
    const gpus = data.gpus.filter((gpu) => !gpu.sriov);  // SR-IOV PFs have their own panel
    $("gpus-count").textContent = `${gpus.length}`;
    if (!gpus.length) {
      replace(body, h("p", { class: "empty" }, data.gpus.length
        ? "No mdev-capable GPU: this host's GPUs give SR-IOV VFs (the SR-IOV panel)."
        : "No mdev-capable GPU on this host. 'vgpuctl doctor' says why."));
      return;
    }
    const byVgpu = vmOfVgpu();
    replace(body, gpus.map((gpu) => {
      const vgpus = (gpu.active_vgpus || []).map((uuid) => {
        const row = vgpuRow(uuid);
        const typeId = row ? row.type : null;
        return { uuid, typeId, type: typeId ? typeOf(gpu.parent, typeId) : null, vm: byVgpu.get(uuid) };
      });
      const title = `${gpu.vendor || ""} ${gpu.platform || ""}`.trim() || gpu.parent;
      return h("article", { class: "gpu", "aria-label": `GPU ${gpu.parent}`, dataset: { parent: gpu.parent } },
        h("div", { class: "gpu-head" },
          h("h3", {}, title),
          h("span", { class: "mono" }, gpu.parent),
          h("span", { class: "meta" }, [
            gpu.vendor_id && gpu.device_id ? `${gpu.vendor_id.replace(/^0x/, "")}:${gpu.device_id.replace(/^0x/, "")}` : null,
            gpu.aperture_mib ? `aperture ${fmtNumber(gpu.aperture_mib)} MiB` : null,
            `${vgpus.length} active vGPU${vgpus.length === 1 ? "" : "s"}`,
            gpu.pools ? null : `${gpu.types ?? "its"} types, capacity counted per type (see vGPU types)`,
          ].filter(Boolean).join(" · "))),
        gpu.pools ? h("div", { class: "pools" }, Object.entries(gpu.pools).map(([name, pool]) => poolBar(name, pool, vgpus)))
          : null,
        vgpus.length ? h("ul", { class: "legend", "aria-label": "vGPUs on this GPU" }, vgpus.map((v) =>
          h("li", {},
            h("span", { class: "swatch", style: { background: colourOf(v.uuid) }, "aria-hidden": "true" }),
            h("span", { class: "mono", title: v.uuid }, shortUuid(v.uuid)),
            v.typeId ? h("span", {}, v.typeId) : null,
            v.vm ? h("span", {}, "→ VM ", h("a", { href: vmHref(v.vm.name) }, v.vm.name),
              RUNNING_STATES.has(v.vm.state) ? null : h("span", { class: "empty" }, ` (${v.vm.state})`))
              : h("span", { class: "empty" }, "no VM"),
          ))) : null);
    }));
  };

  const poolBar = (name, pool, vgpus) => {
    const total = Number(pool.total) || 0;
    const used = Number(pool.used) || 0;
    const unit = pool.unit ? ` ${pool.unit}` : "";
    const pct = (value) => (total > 0 ? Math.max(0, Math.min(100, (value / total) * 100)) : 0);
    const segments = [];
    let accounted = 0;
    for (const v of vgpus) {
      const amount = share(name, v.type);
      if (amount === null || amount <= 0) continue;
      accounted += amount;
      const who = v.vm ? `, VM ${v.vm.name}` : "";
      segments.push(h("div", {
        class: "seg", style: { width: `${pct(amount)}%`, background: colourOf(v.uuid) },
        title: `${v.uuid} (${v.typeId || "?"}${who}): ${fmtNumber(amount)}${unit}`,
        dataset: { vgpu: v.uuid },
      }));
    }
    if (used > accounted) {
      segments.push(h("div", {
        class: "seg other", style: { width: `${pct(used - accounted)}%` },
        title: `${fmtNumber(used - accounted)}${unit} in use by vGPUs not listed here`,
      }));
    }
    const full = total > 0 && used >= total;
    return h("div", { class: `pool${full ? " full" : ""}`, dataset: { pool: name, used, total } },
      h("div", { class: "pool-label" },
        h("span", { class: "name" }, name),
        h("span", { class: "value" }, `${fmtNumber(used)} / ${fmtNumber(total)}${unit}`)),
      h("div", {
        class: "bar", role: "meter", "aria-label": name,
        "aria-valuemin": 0, "aria-valuemax": total, "aria-valuenow": used,
        "aria-valuetext": `${fmtNumber(used)} of ${fmtNumber(total)}${unit} used`,
      }, segments));
  };

  // ---------------------------------------------------------------- SR-IOV PFs and their VFs

  const renderVfs = () => {
    const section = $("vfs");
    const body = $("vfs-body");
    if (!data.vfs) return;
    section.hidden = data.vfs.length === 0;  // a host without SR-IOV GPUs shows no panel
    const enabled = data.vfs.reduce((n, pf) => n + pf.vfs.length, 0);
    $("vfs-count").textContent = `${data.vfs.length} PF${data.vfs.length === 1 ? "" : "s"}, ${enabled} VF${enabled === 1 ? "" : "s"}`;
    const vmNames = new Set((data.vms || []).map((vm) => vm.name));
    replace(body, data.vfs.map((pf) => {
      const count = pf.enabled_vfs === null ? "?" : pf.enabled_vfs;
      return h("article", { class: "gpu sriov", "aria-label": `SR-IOV PF ${pf.pf}`, dataset: { pf: pf.pf, enabled: count } },
        h("div", { class: "gpu-head" },
          h("h3", {}, pf.backend === "nvidia-vfio" ? "NVIDIA vendor-specific VFIO" : "Intel SR-IOV"),
          h("span", { class: "mono" }, pf.pf),
          h("span", { class: "meta" }, [
            pf.device ? `${pf.vendor_id || "8086"}:${pf.device}` : null,
            pf.driver || "no driver",
            `VFs ${count}/${pf.total_vfs}`,
            `VFs on ${pf.vfio_driver}`,
            pf.enabled_by_vgpuctl ? "enabled by vgpuctl" : null,
          ].filter(Boolean).join(" · "))),
        pf.problem ? h("p", { class: "error" }, pf.problem) : null,
        pf.vfs.length ? h("table", { class: "vf-table" },
          h("thead", {}, h("tr", {},
            h("th", { scope: "col" }, "VF"),
            h("th", { scope: "col" }, "Driver"),
            pf.backend === "nvidia-vfio" ? h("th", { scope: "col" }, "vGPU type") : null,
            h("th", { scope: "col" }, "Held by"))),
          h("tbody", {}, pf.vfs.map((vf) => {
            const holder = vf.vm ? h("span", {}, "VM ", vmNames.has(vf.vm) ? h("a", { href: vmHref(vf.vm) }, vf.vm) : vf.vm)
              : vf.opened_by ? `open by ${vf.opened_by}` : h("span", { class: "empty" }, "free");
            return h("tr", { dataset: { vf: vf.address, vm: vf.vm || null } },
              h("th", { scope: "row", class: "mono" }, vf.address),
              h("td", {}, vf.driver || "no driver"),
              pf.backend === "nvidia-vfio" ? h("td", {}, vf.vgpu_type
                ? `${vf.vgpu_type.name || "type"} (${vf.vgpu_type.id})` : h("span", { class: "empty" }, "none")) : null,
              h("td", { class: "vm-cell" }, holder));
          }))) : h("p", { class: "empty" }, pf.backend === "nvidia-vfio"
          ? "No VFs enabled: NVIDIA's sriov-manage -e enables them."
          : `No VFs enabled: 'vgpuctl vfs enable ${pf.pf} N' (or POST api/v1/vfs/${pf.pf}/enable).`));
    }));
  };

  // ---------------------------------------------------------------- types

  const openTypeGroups = new Set();  // GPUs whose type list is unfolded (kept across updates)
  let typeGroupsSeen = false;

  const renderTypes = () => {
    const body = $("types-body");
    if (!data.types) return;
    $("types-count").textContent = `${data.types.length}`;
    if (!data.types.length) {
      replace(body, h("p", { class: "empty" }, "No vGPU types."));
      return;
    }
    const groups = new Map();
    for (const t of data.types) {
      if (!groups.has(t.parent)) groups.set(t.parent, []);
      groups.get(t.parent).push(t);
    }
    if (!typeGroupsSeen) {  // at first: every GPU's list open when there are few, else the first one's
      typeGroupsSeen = true;
      [...groups.keys()].slice(0, groups.size <= 2 ? 2 : 1).forEach((parent) => openTypeGroups.add(parent));
    }
    const table = (rows) => {
      const gvt = rows.some((t) => t.fields && t.fields.low_gm_mib !== undefined);
      const mib = (v) => (v === undefined || v === null ? "–" : `${fmtNumber(v)} MiB`);
      return h("table", {},
        h("thead", {}, h("tr", {},
          h("th", { scope: "col" }, "Type"),
          h("th", { scope: "col" }, "Resolution"),
          gvt ? [h("th", { scope: "col", class: "num" }, "Low GM"), h("th", { scope: "col", class: "num" }, "High GM"),
            h("th", { scope: "col", class: "num" }, "Fences")] : h("th", { scope: "col", class: "num" }, "Memory"),
          h("th", { scope: "col", class: "num" }, "Available"))),
        h("tbody", {}, rows.map((t) => {
          const f = t.fields || {};
          return h("tr", { dataset: { type: t.type, parent: t.parent } },
            h("th", { scope: "row", class: "mono", title: t.description || "" }, t.type),
            h("td", {}, t.resolution || f.resolution || "–"),
            gvt ? [h("td", { class: "num" }, mib(f.low_gm_mib)), h("td", { class: "num" }, mib(f.high_gm_mib)),
              h("td", { class: "num" }, f.fences ?? "–")] : h("td", { class: "num" }, mib(t.memory_mib)),
            h("td", { class: `num${t.available_instances === 0 ? " none-left" : ""}`,
              dataset: { available: t.available_instances } }, fmtNumber(t.available_instances)));
        })));
    };
    if (groups.size === 1) {
      replace(body, table(data.types));
      return;
    }
    replace(body, [...groups].map(([parent, rows]) => {
      const gpu = (data.gpus || []).find((g) => g.parent === parent);
      const withRoom = rows.filter((t) => Number(t.available_instances) > 0).length;
      const group = h("details", { class: "type-group", open: openTypeGroups.has(parent), dataset: { parent } },
        h("summary", {}, h("span", { class: "mono" }, parent),
          ` · ${gpu ? `${gpu.vendor || ""} ${gpu.platform || ""}`.trim() : ""} · ${rows.length} types, ` +
          `${withRoom} with room for one more`),
        table(rows));
      group.addEventListener("toggle", () => {
        if (group.open) openTypeGroups.add(parent);
        else openTypeGroups.delete(parent);
      });
      return group;
    }));
  };

  // ---------------------------------------------------------------- vGPUs

  const renderVgpus = () => {
    const body = $("vgpus-body");
    if (!data.vgpus) return;
    $("vgpus-count").textContent = `${data.vgpus.length}`;
    if (!data.vgpus.length) {
      replace(body, h("p", { class: "empty" }, "No vGPUs yet. A VM's vGPU is created when it starts."));
      return;
    }
    const byVgpu = vmOfVgpu();
    replace(body, h("table", {},
      h("thead", {}, h("tr", {},
        h("th", { scope: "col" }, "UUID"),
        h("th", { scope: "col" }, "Type"),
        h("th", { scope: "col" }, "State"),
        h("th", { scope: "col" }, "Owner"),
        h("th", { scope: "col" }, "VM"))),
      h("tbody", {}, data.vgpus.map((v) => {
        const vm = byVgpu.get(v.uuid);
        return h("tr", { dataset: { uuid: v.uuid } },
          h("th", { scope: "row", class: "mono", title: `${v.uuid} on ${v.parent}` },
            h("span", { class: "swatch", style: { background: colourOf(v.uuid), marginRight: "6px" }, "aria-hidden": "true" }),
            shortUuid(v.uuid)),
          h("td", { class: "mono" }, v.type || "–"),
          h("td", {},
            h("span", { class: `tag${v.active ? " on" : ""}` }, v.active ? "active" : "inactive"), " ",
            v.defined ? h("span", { class: "tag", title: "persistent definition (mdevctl)" }, `defined${v.start ? `, ${v.start}` : ""}`) : null),
          h("td", {}, v.owner || "–"),
          h("td", { class: "vm-cell" }, vm ? [h("a", { href: vmHref(vm.name) }, vm.name), " ",
            h("span", { class: "state", dataset: { state: vm.state } }, vm.state)] : "–"));
      }))));
  };

  // ---------------------------------------------------------------- VMs

  const renderVms = () => {
    const body = $("vms-body");
    if (!data.vms) return;
    $("vms-count").textContent = `${data.vms.length}`;
    const names = new Set(data.vms.map((vm) => vm.name));
    for (const [name, card] of cards) {
      if (!names.has(name)) {
        if (card.url) URL.revokeObjectURL(card.url);
        cards.delete(name);
      }
    }
    if (!data.vms.length) {
      replace(body, h("p", { class: "empty" }, "No VMs. 'vgpuctl vm create NAME --profile streaming' makes one."));
      return;
    }
    const ordered = data.vms.map((vm) => {
      let card = cards.get(vm.name);
      if (!card) {
        card = makeCard(vm.name);
        cards.set(vm.name, card);
      }
      updateCard(card, vm);
      return card.root;
    });
    // Keep existing nodes in place (focus, images); only reorder when needed.
    const present = Array.from(body.children);
    if (present.length !== ordered.length || present.some((node, i) => node !== ordered[i])) replace(body, ordered);
  };

  const makeCard = (name) => {
    const id = `vm-${name.replace(/[^A-Za-z0-9_-]/g, "_")}`;
    const card = { name, url: null, loading: false, shownState: null };
    card.img = h("img", { alt: `Screen of VM ${name}`, hidden: true });
    card.off = h("div", { class: "off" }, "stopped");
    card.state = h("span", { class: "state" });
    card.facts = h("p", { class: "facts" });
    card.error = h("p", { class: "error", role: "alert" });
    card.buttons = {};
    for (const [action, info] of Object.entries(ACTIONS)) {
      card.buttons[action] = h("button", {
        type: "button", class: info.cls || null, "aria-label": `${info.label} VM ${name}`, dataset: { action },
        onclick: () => runAction(name, action),
      }, info.label);
    }
    card.root = h("article", { class: "vm", "aria-labelledby": `${id}-title`, dataset: { vm: name } },
      // The thumbnail links where the name does: one tab stop per VM, the name's.
      h("a", { class: "thumb", href: vmHref(name), tabindex: "-1", "aria-hidden": "true" }, card.img, card.off),
      h("div", { class: "body" },
        h("div", { class: "title" },
          h("h3", { id: `${id}-title` }, h("a", { href: vmHref(name) }, name)),
          card.state),
        card.facts,
        h("div", { class: "actions" }, Object.values(card.buttons)),
        card.error));
    return card;
  };

  const updateCard = (card, vm) => {
    const action = busy.get(vm.name);
    const shown = action ? ACTIONS[action].busy : vm.state;
    card.state.dataset.state = shown;
    card.state.textContent = shown;
    card.root.dataset.state = vm.state;
    card.vm = vm;
    const facts = [];
    if (vm.profile) facts.push(vm.profile);
    if (vm.memory_mib) facts.push(`${fmtNumber(vm.memory_mib)} MiB`);
    if (vm.cpus) facts.push(`${vm.cpus} CPU${vm.cpus === 1 ? "" : "s"}`);
    const running = RUNNING_STATES.has(vm.state);
    if (vm.accel && running) facts.push(vm.accel.toUpperCase());
    const uuid = vgpuUuidOf(vm);
    if (uuid && running) facts.push(`vGPU ${shortUuid(uuid)}`);
    else if (vgpuRequestOf(vm)) facts.push(vgpuRequestOf(vm));
    if (vm.simulated_display && running) facts.push(vm.simulated_display);
    if (vm.state === "crashed" && vm.detail) facts.push(vm.detail);
    card.facts.textContent = facts.join(" · ");
    card.facts.title = [vm.detail, ...(vm.log_tail || [])].filter(Boolean).join("\n");
    for (const [name, button] of Object.entries(card.buttons)) button.disabled = Boolean(action) || !allowed(name, vm.state);
    card.error.textContent = errors.get(vm.name) || "";
    card.off.hidden = running && card.img.src !== "";
    card.off.textContent = running ? "waiting for the screen…" : vm.state;
    if (!running) card.img.hidden = true;
    if (running && card.shownState !== "running") refreshThumb(card);  // at once, not at the next tick
    card.shownState = running ? "running" : vm.state;
  };

  const runAction = async (name, action) => {
    busy.set(name, action);
    errors.delete(name);
    renderVms();
    announce(`${ACTIONS[action].busy} VM ${name}`);
    let status = null;
    try {
      status = await vmAction(name, action, refreshVms);
      announce(`VM ${name}: ${status ? status.state : `${action} done`}`);
    } catch (err) {
      errors.set(name, `${ACTIONS[action].label} failed: ${err.message}`);
      announce(`VM ${name}: ${action} failed`);
    } finally {
      busy.delete(name);
    }
    refreshVms();
  };

  // ---------------------------------------------------------------- thumbnails

  const refreshThumb = async (card) => {
    if (card.loading) return;
    card.loading = true;
    try {
      const response = await fetch(`${API}vms/${encodeURIComponent(card.name)}/screenshot`,
        { credentials: "same-origin", cache: "no-store" });
      if (response.status === 401) return toLogin();
      if (!response.ok) return;
      const blob = await response.blob();
      if (!card.vm || !RUNNING_STATES.has(card.vm.state)) return;
      const url = URL.createObjectURL(blob);
      await new Promise((resolve) => {
        card.img.onload = card.img.onerror = resolve;
        card.img.src = url;
      });
      if (card.url) URL.revokeObjectURL(card.url);
      card.url = url;
      card.img.hidden = false;
      card.off.hidden = true;
    } catch (err) {
      /* the next tick tries again */
    } finally {
      card.loading = false;
    }
  };

  const onScreen = (node) => {
    const box = node.getBoundingClientRect();
    return box.bottom > 0 && box.top < innerHeight && box.right > 0 && box.left < innerWidth;
  };

  setInterval(() => {  // screenshots of the running VMs one can see, while the page is visible
    if (document.hidden) return;
    for (const card of cards.values()) {
      if (card.vm && RUNNING_STATES.has(card.vm.state) && onScreen(card.root)) refreshThumb(card);
    }
  }, THUMB_EVERY_MS);

  // ---------------------------------------------------------------- doctor

  let doctorRan = false;
  const runDoctor = async () => {
    doctorRan = true;
    const button = $("doctor-run");
    const body = $("doctor-body");
    button.disabled = true;
    button.textContent = "Checking…";
    try {
      renderDoctor(await apiJson("doctor"));
    } catch (err) {
      replace(body, h("p", { class: "error", role: "alert" }, `The doctor could not run: ${err.message}`));
    } finally {
      button.disabled = false;
      button.textContent = "Run doctor again";
    }
  };

  const renderDoctor = (report) => {
    const checks = report.checks || [];
    const counts = {};
    for (const c of checks) counts[c.status] = (counts[c.status] || 0) + 1;
    const words = { fail: "failed", warn: "warnings", ok: "ok", skip: "skipped" };
    const summary = ["fail", "warn", "ok", "skip"].filter((s) => counts[s]).map((s) => `${counts[s]} ${words[s]}`);
    const problems = checks.filter((c) => c.status === "fail" || c.status === "warn")
      .sort((a, b) => (a.status === b.status ? 0 : a.status === "fail" ? -1 : 1));
    const rest = checks.filter((c) => !problems.includes(c));
    const item = (c) => h("li", { dataset: { check: c.id, status: c.status } },
      h("div", { class: "check-head" },
        h("span", { class: `status ${c.status}` }, c.status),
        h("strong", {}, c.title || c.id)),
      c.detail ? h("p", { class: "check-detail" }, c.detail) : null,
      c.blocked_by ? h("p", { class: "check-detail" }, `Skipped: needs “${c.blocked_by}” first.`) : null,
      c.fix ? h("div", { class: "fix" }, h("strong", {}, "Fix"), h("pre", { class: "mono" }, c.fix)) : null,
      c.evidence && c.evidence.length ? h("details", {},
        h("summary", {}, `Evidence (${c.evidence.length})`),
        h("ul", {}, c.evidence.map((e) => h("li", {},
          h("code", {}, e.path), " = ", h("code", {}, e.value ?? "–"))))) : null);
    replace($("doctor-body"),
      h("p", { class: `verdict ${report.ready === false ? "not-ready" : "ready"}` }, report.verdict || ""),
      h("p", { class: "empty" }, [summary.join(", "), report.kernel ? `kernel ${report.kernel}` : null,
        report.simulated ? "simulated host" : null].filter(Boolean).join(" · ")),
      problems.length ? h("ul", { class: "checks problems" }, problems.map(item)) : null,
      rest.length ? h("details", { class: "more-checks", open: problems.length === 0 && rest.length <= 6 },
        h("summary", {}, `${problems.length ? "The other" : "All"} ${rest.length} checks ` +
          `(${["ok", "skip"].filter((s) => counts[s]).map((s) => `${counts[s]} ${words[s]}`).join(", ")})`),
        h("ul", { class: "checks" }, rest.map(item))) : null);
  };

  $("doctor-run").addEventListener("click", runDoctor);

  // ---------------------------------------------------------------- start

  subscribe({
    gpus: (rows) => apply("gpus", rows, true),
    vgpus: (rows) => apply("vgpus", rows, true),
    vms: (rows) => apply("vms", rows, true),
    vfs: (rows) => apply("vfs", rows, true),
    problems: renderProblems,
  });
  apiJson("problems").then(renderProblems, () => {});
  for (const kind of ["types", "gpus", "vgpus", "vms", "vfs"]) {
    apiJson(kind).then((rows) => {
      if (kind === "types") {
        if (data.types === null) {
          data.types = rows;
          renderTypes();
          renderGpus();
        }
      } else {
        apply(kind, rows, false);
      }
    }, (err) => {
      const body = $(`${kind}-body`);
      if (body && data[kind] === null) replace(body, h("p", { class: "error" }, err.message));
    });
  }
}

// Files vgpuctl cannot read (a definition, a VM spec): each with its path and error, until it is fixed.
function renderProblems(rows) {
  const section = $("problems");
  section.hidden = rows.length === 0;
  $("problems-count").textContent = rows.length ? String(rows.length) : "";
  replace($("problems-body"), ...rows.map((p) => h("li", { class: "problem" },
    h("span", { class: "kind" }, p.kind === "definition" ? "vGPU definition" : "VM spec"), " ",
    h("code", {}, p.path), ": ", h("span", { class: "error" }, p.error))));
}

function vmHref(name) {
  return `vm.html?name=${encodeURIComponent(name)}`;
}

// ====================================================================== a VM's page

function vmPage() {
  const params = new URLSearchParams(location.search);
  let name = params.get("name");
  if (!name && location.hash.startsWith("#vm/")) name = decodeURIComponent(location.hash.slice(4));
  if (!name) {
    location.replace("./");
    return;
  }
  document.title = `${name} — vgpuctl`;
  $("vm-name").textContent = name;
  $("vm-title").textContent = `VM ${name}`;
  const canvas = $("screen");
  canvas.setAttribute("aria-label", `Display of VM ${name}: click it, then type; keyboard and mouse go to the VM`);
  const overlay = $("screen-overlay");
  const stats = $("stream-stats");
  let vm = null;
  let busy = null;

  const setOverlay = (text) => {
    overlay.hidden = !text;
    overlay.textContent = text || "";
  };

  // The stream's codec comes from the page's address (?codec=), so a reload or a shared link keeps it.
  const codecs = ["auto", "h264", "jpeg"];
  const asked = new URLSearchParams(location.search).get("codec");
  const codec = codecs.includes(asked) ? asked : "auto";
  const codecSelect = $("vm-codec");
  codecSelect.value = codec;
  codecSelect.addEventListener("change", () => {
    const address = new URL(location.href);
    address.searchParams.set("codec", codecSelect.value);
    location.assign(address.href);
  });

  const player = new DisplayPlayer(canvas, displayUrl(name), {
    onStatus: (state, text) => {
      canvas.dataset.stream = state;
      if (state === "live") {
        setOverlay("");
        if (document.activeElement === document.body) canvas.focus({ preventScroll: true });
      } else if (vm && RUNNING_STATES.has(vm.state)) {
        setOverlay(text);
      }
    },
    onStats: (text) => { stats.textContent = text; },
    codec,
  });

  const buttons = { start: $("vm-start"), stop: $("vm-stop"), kill: $("vm-kill") };
  for (const [action, button] of Object.entries(buttons)) {
    button.setAttribute("aria-label", `${ACTIONS[action].label} VM ${name}`);
    button.addEventListener("click", async () => {
      busy = action;
      $("vm-error").textContent = "";
      update();
      try {
        await vmAction(name, action, () => show(rows));
      } catch (err) {
        $("vm-error").textContent = `${ACTIONS[action].label} failed: ${err.message}`;
      } finally {
        busy = null;
      }
      show(rows);
    });
  }

  const fit = $("vm-fit");
  fit.addEventListener("click", () => {  // a toggle: pressed scales the display to the window, else 1:1
    const on = fit.getAttribute("aria-pressed") !== "true";
    fit.setAttribute("aria-pressed", String(on));
    $("screen-wrap").classList.toggle("fit", on);
  });

  const update = () => {
    const state = vm ? vm.state : "unknown";
    const shown = busy ? ACTIONS[busy].busy : state;
    const badge = $("vm-state");
    badge.dataset.state = shown;
    badge.textContent = vm ? shown : "no such VM";
    for (const [action, button] of Object.entries(buttons)) button.disabled = !vm || Boolean(busy) || !allowed(action, state);
    const facts = [];
    if (vm) {
      if (vm.profile) facts.push(vm.profile);
      const running = RUNNING_STATES.has(state);
      if (vm.accel && running) facts.push(vm.accel.toUpperCase());
      const uuid = vgpuUuidOf(vm);
      if (uuid && running) facts.push(`vGPU ${uuid}`);
      else if (vgpuRequestOf(vm)) facts.push(vgpuRequestOf(vm));
      if (vm.simulated_display && running) facts.push(vm.simulated_display);
      if (vm.detail) facts.push(vm.detail);
    }
    $("vm-facts").textContent = facts.join(" · ");
    if (vm && RUNNING_STATES.has(state)) {
      player.start();
      player.reconnectNow();
    } else {
      player.stop();
      stats.textContent = "";
      canvas.dataset.stream = "stopped";
      setOverlay(vm ? `VM ${name} is ${state}${state === "stopped" ? ": start it to see its display" : ""}` : `no VM ${name}`);
    }
  };

  let rows = [];
  const show = (latest) => {
    rows = latest;
    const row = rows.find((r) => r.name === name);
    vm = row ? current(row) : null;
    update();
  };

  subscribe({ vms: show, gpus: () => {}, vgpus: () => {}, vfs: () => {} });
  apiJson("vms").then(show, (err) => { $("vm-error").textContent = err.message; });
}

// ====================================================================== entry

function loginPage() {
  const params = new URLSearchParams(location.search);
  if (params.has("error")) $("login-error").hidden = false;
  const next = params.get("next");
  if (next && next.startsWith("/") && !next.startsWith("//")) $("next").value = next;  // this site only
}

const PAGES = { overview, vm: vmPage, login: loginPage };
PAGES[document.body.dataset.page]?.();
