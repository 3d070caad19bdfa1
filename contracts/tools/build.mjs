// Compiles contracts/src (and the test fixtures the Rust tests deploy) with the pinned solcjs
// and writes one artifact per contract to the given directory: {contractName, abi, bytecode,
// deployedBytecode, compiler}; the fixtures' go under test/.
// Settings match foundry.toml (optimizer 20000 runs, cancun, no metadata hash) so the
// committed artifacts are reproducible byte for byte.
import fs from "node:fs";
import path from "node:path";
import { createRequire } from "node:module";

const require = createRequire(import.meta.url);
const solc = require("solc");
const root = path.resolve(path.dirname(new URL(import.meta.url).pathname), "..");
const outDir = path.resolve(process.argv[2] ?? path.join(root, "artifacts"));
// [source directory, contract, artifact path]: the deployable contracts, then the contracts the
// Rust tests deploy beside them (a contract wallet), kept apart under test/.
const artifacts = [
  ["src", "ModelRegistry", "ModelRegistry.json"],
  ["src", "LicenseMarket", "LicenseMarket.json"],
  ["src", "ComputeMarket", "ComputeMarket.json"],
  ["test/fixtures", "SmartWallet", "test/SmartWallet.json"],
];

const sources = {};
for (const dir of ["src", "test/fixtures"]) {
  for (const file of fs.readdirSync(path.join(root, dir)).sort()) {
    if (file.endsWith(".sol")) {
      sources[`${dir}/${file}`] = { content: fs.readFileSync(path.join(root, dir, file), "utf8") };
    }
  }
}

function findImports(importPath) {
  const candidates = [path.join(root, importPath), path.join(root, "node_modules", importPath)];
  for (const candidate of candidates) {
    if (fs.existsSync(candidate)) return { contents: fs.readFileSync(candidate, "utf8") };
  }
  return { error: `import not found: ${importPath}` };
}

const input = {
  language: "Solidity",
  sources,
  settings: {
    optimizer: { enabled: true, runs: 20000 },
    evmVersion: "cancun",
    metadata: { bytecodeHash: "none", appendCBOR: false },
    outputSelection: { "*": { "*": ["abi", "evm.bytecode.object", "evm.deployedBytecode.object"] } },
  },
};

const output = JSON.parse(solc.compile(JSON.stringify(input), { import: findImports }));
const errors = (output.errors ?? []).filter((e) => e.severity === "error");
for (const e of output.errors ?? []) process.stderr.write(e.formattedMessage + "\n");
if (errors.length > 0) process.exit(1);

for (const [dir, name, file] of artifacts) {
  const contract = output.contracts[`${dir}/${name}.sol`]?.[name];
  if (!contract) throw new Error(`${name} missing from the compiler output`);
  const artifact = {
    contractName: name,
    compiler: `solc ${solc.version()}`,
    abi: contract.abi,
    bytecode: `0x${contract.evm.bytecode.object}`,
    deployedBytecode: `0x${contract.evm.deployedBytecode.object}`,
  };
  fs.mkdirSync(path.dirname(path.join(outDir, file)), { recursive: true });
  fs.writeFileSync(path.join(outDir, file), JSON.stringify(artifact, null, 2) + "\n");
  console.log(`${name}: ${contract.evm.deployedBytecode.object.length / 2} bytes deployed`);
}
