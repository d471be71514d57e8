"""The web page served at `/`: plain HTML and JavaScript, no build step, talking to /api/predict.

Every figure goes through `num`, so an undefined one (null) reads "n/a"."""

PAGE_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>pneumoscan</title>
<style>
body{font:15px/1.5 system-ui,sans-serif;max-width:1100px;margin:1.5em auto;padding:0 1em;color:#222}
.warn{background:#fff3cd;border-left:5px solid #e0a800;padding:.6em 1em;margin:1em 0}
#drop{border:2px dashed #888;border-radius:8px;padding:2em;text-align:center;cursor:pointer;background:#fafafa}
#drop.over{background:#e8f0fe;border-color:#1a73e8}
#results{display:flex;flex-wrap:wrap;gap:1em;margin-top:1em}
.card{border:1px solid #ccc;border-radius:6px;padding:.6em;width:320px}
.card img{width:100%;display:block;border-radius:4px}
.card .name{font-weight:600;word-break:break-all}
.PNEUMONIA,.BACTERIAL,.VIRAL{color:#b00020;font-weight:700}.NORMAL{color:#1b5e20;font-weight:700}
.error{color:#b00020}
.note{background:#fff3cd;border-left:4px solid #e0a800;color:#5c4500;padding:.3em .6em;margin:.4em 0}
.ood{color:#b00020;font-weight:bold}
label.toggle{font-size:.9em}
#token{width:16em}
</style></head><body>
<h1>pneumoscan</h1>
<p class="warn"><strong>Research tool, not a medical device.</strong> It tells pneumonia from normal on pediatric
chest X-rays as a research model; it must not be used for diagnosis or treatment decisions.</p>
<p id="model">Loading model information...</p>
<p id="validation"></p>
<div id="drop" tabindex="0">Drop chest X-rays here (JPEG, PNG or DICOM), or click to choose files.
<input id="files" type="file" multiple accept=".jpg,.jpeg,.png,.dcm,.dicom,image/*,application/dicom" hidden></div>
<p><label>API token (only if the server asks for one): <input id="token" type="password" autocomplete="off"></label></p>
<div id="status" role="status"></div>
<div id="results"></div>
<script>
const drop = document.getElementById('drop'), input = document.getElementById('files');
const results = document.getElementById('results'), statusEl = document.getElementById('status');
function headers() {
  const t = document.getElementById('token').value.trim();
  return t ? {'Authorization': 'Bearer ' + t} : {};
}
function num(v, digits) { return (typeof v === 'number' && isFinite(v)) ? v.toFixed(digits) : 'n/a'; }
function text(tag, value, cls) { const e = document.createElement(tag); e.textContent = value; if (cls) e.className = cls; return e; }
async function loadModel() {
  const r = await fetch('api/model', {headers: headers()});
  const el = document.getElementById('model');
  if (!r.ok) { el.textContent = 'Model information unavailable (' + r.status + ').'; return; }
  const m = await r.json();
  el.textContent = 'Model: ' + m.name + (m.name === 'seed' ? ' (' + m.activation + ')' : '') + ', recipe ' + m.recipe +
    ', threshold ' + num(m.threshold, 3) + (m.threshold_interval ? ' (95% interval ' + num(m.threshold_interval[0], 3) +
    '-' + num(m.threshold_interval[1], 3) + ')' : '') + ', calibration ' + (m.calibration ? m.calibration.method : 'none') +
    ', prior (pneumonia prevalence) ' + num(m.assumed_prevalence, 3) + ' (' + m.prevalence_source + ')' +
    ', classes ' + m.class_names.join(' / ') + '.';
  const v = m.validation;
  if (v) {
    const names = ['accuracy', 'precision', 'recall', 'specificity', 'f1', 'roc_auc'].filter(k => k in v);
    document.getElementById('validation').textContent = 'Validation (' + v.split + ' split' +
      (v.n ? ', ' + v.n + ' images' : '') + '): ' + names.map(k => k + ' ' + num(v[k], 3)).join(' · ') + '.';
  }
}
function show(item, objectUrl) {
  const card = document.createElement('div'); card.className = 'card'; card.dataset.filename = item.filename;
  card.appendChild(text('div', item.filename, 'name'));
  if (item.error) { card.appendChild(text('p', 'Error: ' + item.error, 'error')); results.appendChild(card); return; }
  const img = document.createElement('img'); img.alt = 'X-ray ' + item.filename;
  const heat = item.heatmap_png ? 'data:image/png;base64,' + item.heatmap_png : null;
  img.src = heat || objectUrl; card.appendChild(img);
  const p = text('p', ''); p.appendChild(text('span', item.label, item.label));
  p.appendChild(document.createTextNode(' - probability of PNEUMONIA: ' +
    num(item.p_pneumonia, 3) + ' (threshold ' + num(item.threshold, 3) + ', prior ' + num(item.assumed_prevalence, 3) + ')'));
  p.className = 'prob'; card.appendChild(p);
  if (item.outside_training) {
    card.appendChild(text('p', 'This image is outside what this model was trained on (out-of-distribution score ' +
      num(item.ood_score, 1) + '): the probability above means little.', 'ood'));
  }
  (item.warnings || []).forEach(w => card.appendChild(text('p', 'Warning: ' + w, 'note')));  // beside the probability
  if (item.probabilities) {  // a three-class model: each class's probability
    card.appendChild(text('p', Object.entries(item.probabilities).map(([k, v]) => k + ' ' + num(v, 3)).join(' · '), 'classes'));
  }
  if (heat) {
    const lab = document.createElement('label'); lab.className = 'toggle';
    const box = document.createElement('input'); box.type = 'checkbox'; box.checked = true; box.className = 'heat-toggle';
    box.onchange = () => { img.src = box.checked ? heat : objectUrl; };
    lab.appendChild(box); lab.appendChild(document.createTextNode(' show Grad-CAM heatmap')); card.appendChild(lab);
  }
  results.appendChild(card);
}
async function upload(fileList) {
  const files = Array.from(fileList); if (!files.length) return;
  const form = new FormData(); files.forEach(f => form.append('files', f, f.name));
  statusEl.textContent = 'Scoring ' + files.length + ' file(s)...';
  try {
    const r = await fetch('api/predict', {method: 'POST', body: form, headers: headers()});
    const body = await r.json().catch(() => ({detail: 'unreadable answer'}));
    if (!body.results) { statusEl.textContent = 'Error ' + r.status + ': ' + (body.detail || 'request refused'); return; }
    body.results.forEach((item, i) => show(item, URL.createObjectURL(files[i])));
    statusEl.textContent = 'Done: ' + body.results.filter(x => !x.error).length + ' scored, ' +
      body.results.filter(x => x.error).length + ' could not be read.';
  } catch (e) { statusEl.textContent = 'Error: ' + e; }
}
drop.onclick = () => input.click();
drop.onkeydown = e => { if (e.key === 'Enter' || e.key === ' ') input.click(); };
input.onchange = () => { upload(input.files); input.value = ''; };
drop.ondragover = e => { e.preventDefault(); drop.classList.add('over'); };
drop.ondragleave = () => drop.classList.remove('over');
drop.ondrop = e => { e.preventDefault(); drop.classList.remove('over'); upload(e.dataTransfer.files); };
loadModel();
</script></body></html>
"""
