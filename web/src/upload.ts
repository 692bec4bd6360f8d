// The upload page for GIS staff: send a file (POST /layers, bearer key of role gis-editor),
// follow its job (GET /jobs/{id}) on a progress bar, then show the layer or the reasons. When
// the file names no CRS (the job report says it needs source_crs), ask for one and retry.

import { ApiError, apiGet, apiPost, type Job, type UploadFields } from "./api";
import { t } from "./i18n";

const POLL_MS = 400;

export class UploadPage {
  private form = document.getElementById("upload-form") as HTMLFormElement;
  private key = document.getElementById("upload-key") as HTMLInputElement;
  private lastJob: Job | null = null;

  constructor(private onPublished: (layerId: string) => void) {
    this.key.value = sessionStorage.getItem("twin.key") ?? "";
    this.form.addEventListener("submit", (event) => {
      event.preventDefault();
      void this.submit();
    });
    document.getElementById("upload-show")!.addEventListener("click", () => {
      if (this.lastJob) this.onPublished(this.lastJob.layer_id);
    });
    document.getElementById("crs-prompt-retry")!.addEventListener("click", () => {
      const chosen = (document.getElementById("crs-prompt-select") as HTMLSelectElement).value;
      (document.getElementById("upload-crs") as HTMLSelectElement).value = chosen;
      void this.submit();
    });
  }

  /** The CRS question, with the form's list of CRSs (all but "detect from the file"). */
  private askForCrs(): void {
    const choices = [...(document.getElementById("upload-crs") as HTMLSelectElement).options]
      .filter((option) => option.value)
      .map((option) => new Option(option.text, option.value));
    const select = document.getElementById("crs-prompt-select") as HTMLSelectElement;
    select.replaceChildren(...choices);
    document.getElementById("crs-prompt")!.hidden = false;
    select.focus();
  }

  private async submit(): Promise<void> {
    const file = (document.getElementById("upload-file") as HTMLInputElement).files?.[0];
    if (!file) return;
    sessionStorage.setItem("twin.key", this.key.value);
    const body = new FormData();
    body.set("file" satisfies keyof UploadFields, file);
    // Field names from the document: a renamed form field fails the build, not the upload.
    const fields: Array<[keyof UploadFields, string]> = [["title", "upload-title"],
      ["source_crs", "upload-crs"], ["datum", "upload-datum"]];
    for (const [name, id] of fields) {
      const value = (document.getElementById(id) as HTMLInputElement).value.trim();
      if (value) body.set(name, value);
    }
    this.show({ progress: 0, step: t("upload.sending"), reasons: [] });
    const submit = document.getElementById("upload-submit") as HTMLButtonElement;
    submit.disabled = true;
    try {
      const answer = await apiPost("/layers", body,
        { headers: { Authorization: `Bearer ${this.key.value}` } });
      await this.follow("job" in answer ? answer.job : answer);
    } catch (error) {
      const message = error instanceof ApiError ? error.message : String(error);
      this.show({ progress: 0, step: t("upload.failed"), reasons: [message], failed: true });
    } finally {
      submit.disabled = false;
    }
  }

  private async follow(job: Job): Promise<void> {
    while (job.state === "queued" || job.state === "running") {
      this.show({ progress: job.progress, step: job.step, reasons: [] });
      await new Promise((resolve) => setTimeout(resolve, POLL_MS));
      job = await apiGet("/jobs/{job_id}", { path: { job_id: job.id } },
        { headers: { Authorization: `Bearer ${this.key.value}` } });
    }
    this.lastJob = job;
    const done = job.state === "succeeded";
    this.show({ progress: done ? 100 : job.progress, step: t(done ? "upload.succeeded"
      : "upload.failed") + (job.step ? ` · ${job.step}` : ""), reasons: job.reasons ?? [],
      failed: !done });
    const showButton = document.getElementById("upload-show")!;
    showButton.hidden = !done;
    if (!done && job.report?.needs?.includes("source_crs")) this.askForCrs();
    const box = document.getElementById("upload-status")!;
    box.dataset.state = job.state;
    box.dataset.layerId = job.layer_id;
  }

  private show(status: { progress: number; step: string; reasons: Job["reasons"];
                         failed?: boolean }): void {
    const box = document.getElementById("upload-status")!;
    box.hidden = false;
    box.dataset.state = status.failed ? "failed" : "running";
    const bar = document.getElementById("upload-bar")!;
    bar.style.width = `${Math.max(0, Math.min(100, status.progress))}%`;
    bar.textContent = `${Math.round(status.progress)}%`;
    bar.classList.toggle("failed", Boolean(status.failed));
    document.getElementById("upload-step")!.textContent = status.step;
    document.getElementById("upload-reasons")!.replaceChildren(...status.reasons.map((reason) => {
      const item = document.createElement("li");
      item.textContent = typeof reason === "string" ? reason
        : String(reason.message ?? reason.reason ?? JSON.stringify(reason));
      return item;
    }));
    document.getElementById("upload-show")!.hidden = true;
    document.getElementById("crs-prompt")!.hidden = true;
  }
}
