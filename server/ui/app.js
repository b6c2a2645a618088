// Start-up: ask the server whether it needs an API key (`GET /v1/cluster/auth`, open to all), ask the user for
// one if so, then load the models and start the panels. A 401 anywhere brings the key form back.

import { getJson, hasKey, setKey } from "./api.js";
import { startBatchPanel } from "./batch.js";
import { $, clearError, guarded, showError } from "./dom.js";
import { setConfig, setModels, setUpGenerate } from "./generate.js";
import { current, onModels, refresh, setUpLaunch } from "./models.js";
import { setOcrModels, setUpOcr } from "./ocr.js";

function askForKey() {
  $("#key-form").hidden = false;
  $("#key-state").hidden = true;
  $("#api-key").focus();
}

function showKeySet() {
  $("#key-form").hidden = true;
  $("#key-state").hidden = !hasKey();
}

let launchReady = false;

/** Refresh the model list when /metrics names other models than the page knows (launched or terminated
 * elsewhere). */
function followModels(uids) {
  const known = current().map((model) => model.id).sort().join("\n");
  if (uids.sort().join("\n") !== known) guarded(refresh);
}

/** Load everything that needs the API (and so the key). */
async function connect() {
  try {
    const config = await getJson("/ui/config.json");
    setConfig(config);
    await refresh();
    if (!launchReady) {
      await setUpLaunch(config);
      launchReady = true;
    }
    showKeySet();
    startBatchPanel(followModels);
  } catch (error) {
    if (error.status === 401) askForKey();
    throw error;
  }
}

async function start() {
  $("#dismiss-error").addEventListener("click", clearError);
  setUpGenerate();
  setUpOcr();
  onModels(setModels);
  onModels(setOcrModels);
  $("#key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    setKey($("#api-key").value.trim());
    $("#api-key").value = "";
    clearError();
    guarded(connect);
  });
  $("#forget-key").addEventListener("click", () => {
    setKey("");
    askForKey();
  });
  const { auth } = await getJson("/v1/cluster/auth");
  if (auth && !hasKey()) {
    askForKey();
    return;
  }
  await connect();
}

start().catch(showError);
