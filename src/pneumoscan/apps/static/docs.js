// The API documentation: Swagger UI on this server's OpenAPI document. With a token, it sends the one typed
// on the main page (the tab's sessionStorage) or in this page's box, which shows when the document answers 401.
const KEY = 'pneumoscan-token';
const form = document.getElementById('token-form'), field = document.getElementById('token');
const problem = document.getElementById('problem');
function token() { return sessionStorage.getItem(KEY) || ''; }
function withToken(request) {
  if (token() && !request.headers.Authorization) request.headers.Authorization = 'Bearer ' + token();
  return request;
}
async function start() {
  const r = await fetch('openapi.json', {headers: token() ? {Authorization: 'Bearer ' + token()} : {}}).catch(() => null);
  const refused = Boolean(r) && r.status === 401;
  form.hidden = !refused;
  problem.hidden = refused || Boolean(r && r.ok);
  if (refused) { field.focus(); return; }
  if (!r || !r.ok) { problem.textContent = 'The OpenAPI document is unavailable (' + (r ? r.status : 'no answer') + ').'; return; }
  SwaggerUIBundle({spec: await r.json(), dom_id: '#swagger-ui', requestInterceptor: withToken, validatorUrl: null,
    presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset], layout: 'BaseLayout',
    deepLinking: true});
}
form.onsubmit = e => { e.preventDefault(); sessionStorage.setItem(KEY, field.value.trim()); start(); };
start();
