import { defineConfig } from "vite";

// twin serves dist/index.html at / and dist/assets under /assets (twin/api/app.py).
export default defineConfig({
  base: "/",
  build: {
    outDir: "dist",
    assetsDir: "assets",
    emptyOutDir: true,
    // maplibre-gl alone is ~1 MB minified; a command hall loads it once and caches it.
    chunkSizeWarningLimit: 1500,
  },
  server: {
    // `npx vite` during development: the API comes from a running `twin serve`.
    proxy: Object.fromEntries(
      ["/styles", "/tiles", "/collections", "/query", "/sectors", "/emergency-plans", "/layers",
        "/jobs"].map((path) => [path, "http://127.0.0.1:8000"]),
    ),
  },
});
