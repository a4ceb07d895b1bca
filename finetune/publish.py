"""`publish`: a run's adapter or merged model, with its model card, to the Hugging Face Hub.

Upload is one commit through huggingface_hub, so a failure leaves no half-uploaded files; a repository this
call created is deleted again if the commit fails. The card is finetune.card's, with the repository's name
and the base's license (read from the Hub). The token comes from HF_TOKEN or `hf auth login` and is only
ever handed to huggingface_hub.
"""

from __future__ import annotations

import json
import logging
import os

from finetune.config import HubConfig
from finetune.errors import UserError
from finetune.run import Run, check_folder
from finetune.tokenizer import base_model_id

log = logging.getLogger("finetune")

def hub_token() -> str:
    """The token of HF_TOKEN or of `hf auth login`, or one clear error."""
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise UserError("Publishing needs a Hugging Face token with write access: set HF_TOKEN, or run "
                        "`hf auth login` (tokens: https://huggingface.co/settings/tokens).")
    return token


def _api(token: str):
    from huggingface_hub import HfApi

    return HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)


def hub_error(e: Exception, repo_id: str) -> UserError:
    """A huggingface_hub or network error -> one message saying what to do."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(e, OfflineModeIsEnabled):
        return UserError("HF_HUB_OFFLINE=1 is set, so nothing can be published: unset it.")
    status = getattr(getattr(e, "response", None), "status_code", None) if isinstance(e, HfHubHTTPError) else None
    if status == 401:
        return UserError("The Hugging Face Hub rejected the token (HF_TOKEN or `hf auth login`): it is invalid or "
                         "expired. Create one with write access at https://huggingface.co/settings/tokens.")
    if status == 403:
        return UserError(f"The token may not write to {repo_id}: use a token with write access to that user or "
                         "organization (https://huggingface.co/settings/tokens), or another hub.repo_id.")
    if status is not None:
        first = str(e).strip().splitlines()[0]
        return UserError(f"The Hugging Face Hub refused the upload to {repo_id} (HTTP {status}: {first}).")
    return UserError(f"Could not reach the Hugging Face Hub ({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else 'no detail'}). "
                     "Check the network (and HF_ENDPOINT if set), then publish the run again.")


def check_access(hub: HubConfig) -> str:
    """Before a long training run with hub.push=true: a token the Hub accepts. Returns the user name."""
    token = hub_token()
    try:
        return _api(token).whoami()["name"]
    except Exception as e:
        raise hub_error(e, hub.repo_id) from None


def publish(run: Run) -> str:
    """Upload the run's adapter/ (or merged/) and its model card to hub.repo_id in one commit; the commit URL."""
    from finetune import card

    hub = run.cfg.hub
    if not hub.repo_id:
        raise UserError("Publishing needs hub.repo_id=USER/NAME: the repository to create or update.")
    folder = run.dir / hub.model
    if not (folder.is_dir() and any(folder.iterdir())):
        hint = (f" Write it with: python -m finetune export run={run.dir} export.merge=true"
                if hub.model == "merged" else "")
        raise UserError(f"hub.model={hub.model} but {folder} holds nothing to publish.{hint}")
    check_folder(folder, "Nothing was uploaded: write the folder again (python -m finetune export run=RUN_DIR), then "
                         "publish")  # every file loads: nothing damaged reaches the Hub
    api = _api(hub_token())
    readme = card.render(run.cfg, run.summary, merged=hub.model == "merged", repo_id=hub.repo_id, online=True)
    operations = commit_operations(run, folder, str(readme))
    message = hub.commit_message or f"finetune: {run.cfg.recipe} {'merged model' if hub.model == 'merged' else 'adapter'}"
    url = commit(api, hub, operations, message)
    log.info("published %s/ to %s (%s, %d files): %s", hub.model, hub.repo_id, "private" if hub.private else "public",
             len(operations), url)
    return url


def commit_operations(run: Run, folder, readme: str) -> list:
    """Every file of the folder, its card, and for an adapter its config naming the base as the Hub knows it
    (model.hub_id may be given only now)."""
    from huggingface_hub import CommitOperationAdd

    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in ("README.md", "adapter_config.json"))
    operations = [CommitOperationAdd(path_in_repo=str(p.relative_to(folder)), path_or_fileobj=str(p)) for p in files]
    if (folder / "adapter_config.json").is_file():
        config = json.loads((folder / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = base_model_id(run.cfg.model)
        if config["base_model_name_or_path"] is None:
            log.warning("The published adapter names no base model (the base is the local folder %s): pass "
                        "model.hub_id=ORG/NAME so that PEFT and the Hub can find it.", run.cfg.model.name_or_path)
        operations.append(CommitOperationAdd(path_in_repo="adapter_config.json",
                                             path_or_fileobj=(json.dumps(config, indent=2, sort_keys=True) + "\n").encode()))
    if run.cfg.hub.gguf:
        operations += gguf_operations(run)
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=readme.encode()))
    return operations


def gguf_operations(run: Run) -> list:
    """hub.gguf=true: gguf/'s files at the repository's top, where the Hub lists GGUF files and `ollama run
    hf.co/REPO:LEVEL` finds them with the chat template and stop tokens (template, params); the Modelfile's FROM
    names its file beside it; the figures as gguf_fidelity.json."""
    from huggingface_hub import CommitOperationAdd

    folder = run.dir / "gguf"
    files = sorted(folder.glob("*.gguf")) if folder.is_dir() else []
    if not files:
        raise UserError(f"hub.gguf=true but {folder} holds no GGUF file: write them with python -m finetune export "
                        f"run={run.dir} export.merge=true export.gguf=[q8_0,q4_k_m]")
    named = {p.name: p for p in files} | {n: folder / n for n in ("Modelfile", "template", "params", "system")} | {
        "gguf_fidelity.json": folder / "fidelity.json"}
    return [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(p)) for name, p in named.items() if p.is_file()]


def commit(api, hub: HubConfig, operations: list, message: str) -> str:
    """One commit to hub.repo_id (created if missing, on hub.revision if given); its URL. A repository created
    here is deleted again if the commit fails: nothing half-done."""
    from huggingface_hub.errors import HfHubHTTPError

    created = False
    try:
        created = not api.repo_exists(hub.repo_id)
        api.create_repo(hub.repo_id, private=hub.private, exist_ok=True)
        if hub.revision:
            api.create_branch(hub.repo_id, branch=hub.revision, exist_ok=True)
        return api.create_commit(hub.repo_id, operations, commit_message=message, revision=hub.revision).commit_url
    except Exception as e:
        if created:
            try:
                api.delete_repo(hub.repo_id, missing_ok=True)
            except Exception:
                log.warning("The empty repository %s could not be deleted after the failed upload.", hub.repo_id)
        if isinstance(e, (HfHubHTTPError, OSError, RuntimeError)) or type(e).__module__.startswith(("httpx", "huggingface_hub")):
            raise hub_error(e, hub.repo_id) from None
        raise
