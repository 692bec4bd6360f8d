import { cpSync, createReadStream, existsSync, statSync } from "node:fs";
import { dirname, extname, join, normalize, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { defineConfig, type Plugin } from "vite";

// twin serves dist/index.html at / and dist/assets under /assets (twin/api/app.py).
const ROOT = dirname(fileURLToPath(import.meta.url));
// CesiumJS loads its web workers, assets (sky box, Earth orientation data), third-party WASM
// and widget CSS at run time from CESIUM_BASE_URL: they are copied into our own build (the
// 3D view works offline; nothing comes from a CDN or Cesium ion).
const CESIUM_BUILD = resolve(ROOT, "node_modules/cesium/Build/Cesium");
const CESIUM_DIRS = ["Workers", "Assets", "ThirdParty", "Widgets"];
const CESIUM_BASE_URL = "/assets/cesium/";

const MIME: Record<string, string> = {
  ".js": "text/javascript", ".json": "application/json", ".wasm": "application/wasm",
  ".css": "text/css", ".png": "image/png", ".jpg": "image/jpeg", ".svg": "image/svg+xml",
};

/** Cesium's static folders: copied to dist/assets/cesium on build, served from node_modules
 *  by the dev server. */
function cesiumStatic(): Plugin {
  let outDir = resolve(ROOT, "dist");
  return {
    name: "twin-cesium-static",
    configResolved(config) {
      outDir = resolve(config.root, config.build.outDir);
    },
    writeBundle() {
      for (const dir of CESIUM_DIRS) {
        cpSync(join(CESIUM_BUILD, dir), join(outDir, "assets", "cesium", dir), { recursive: true });
      }
    },
    configureServer(server) {
      server.middlewares.use(CESIUM_BASE_URL, (req, res, next) => {
        const path = normalize(join(CESIUM_BUILD, decodeURIComponent((req.url ?? "/").split("?")[0])));
        if (!path.startsWith(CESIUM_BUILD) || !existsSync(path) || !statSync(path).isFile()) {
          next();
          return;
        }
        res.setHeader("Content-Type", MIME[extname(path)] ?? "application/octet-stream");
        createReadStream(path).pipe(res);
      });
    },
  };
}

export default defineConfig({
  base: "/",
  define: {
    // Read by CesiumJS (buildModuleUrl) for its workers and assets.
    CESIUM_BASE_URL: JSON.stringify(CESIUM_BASE_URL),
  },
  plugins: [cesiumStatic()],
  build: {
    outDir: "dist",
    assetsDir: "assets",
    emptyOutDir: true,
    // maplibre-gl alone is ~1 MB minified, CesiumJS (loaded only when the 3D view opens) ~4 MB;
    // a command hall loads them once and caches them.
    chunkSizeWarningLimit: 6000,
  },
  server: {
    // `npx vite` during development: the API comes from a running `twin serve`.
    proxy: Object.fromEntries(
      ["/styles", "/tiles", "/collections", "/query", "/sectors", "/emergency-plans", "/layers",
        "/jobs"].map((path) => [path, "http://127.0.0.1:8000"]),
    ),
  },
});
