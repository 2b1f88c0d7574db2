// Validates Prometheus Operator resources (ServiceMonitor, PrometheusRule) against the
// operator's own schemas, as compiled into the @kubernetes-models/prometheus-operator npm
// package (generated from prometheus-operator's API types, the source of its CRDs).
// Usage: node validate-crds.mjs NODE_MODULES_DIR < documents.json   (a JSON array)
// Prints one line per document; exits 1 if any is invalid or of a kind it does not know.
import { readFileSync } from "node:fs";
import { pathToFileURL } from "node:url";

const modules = process.argv[2];
const kinds = ["ServiceMonitor", "PrometheusRule"];
const models = {};
for (const kind of kinds) {
  const file = `${modules}/@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/${kind}.js`;
  models[kind] = (await import(pathToFileURL(file).href))[kind];
}

let failed = false;
for (const doc of JSON.parse(readFileSync(0, "utf8"))) {
  const name = `${doc.kind}/${doc.metadata?.name}`;
  const Model = models[doc.kind];
  if (doc.apiVersion !== "monitoring.coreos.com/v1" || !Model) {
    console.log(`ERROR ${name}: no schema for ${doc.apiVersion} ${doc.kind}`);
    failed = true;
    continue;
  }
  try {
    new Model(doc).validate();
    console.log(`OK ${name}`);
  } catch (e) {
    console.log(`ERROR ${name}: ${e.message}`);
    failed = true;
  }
}
process.exit(failed ? 1 : 0);
