"""``pgen generate --data DIR --users IDS``: prompts built from users' histories in a dataset."""
from __future__ import annotations

from pathlib import Path

from pgen_engine.data.dataset import DataError, load_dataset
from pgen_engine.data.splits import build_splits
from pgen_engine.generation.prompt_file import PromptLine


def parse_user_ids(users: str) -> list[str]:
    """``--users``: a comma-separated list of user ids, or ``@FILE``, one id per line (for ids
    that contain commas, or long lists). Raises ValueError for an empty list or an unreadable file."""
    if users.startswith("@"):
        path = Path(users[1:])
        try:
            text = path.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--users {users}: cannot read the user-id file ({e.__class__.__name__}: {e})") from None
        ids = [line.strip() for line in text.splitlines() if line.strip()]
        if not ids:
            raise ValueError(f"--users {users}: the file holds no user ids (expected one per line)")
        return ids
    ids = [u.strip() for u in users.split(",") if u.strip()]
    if not ids:
        raise ValueError(f"--users {users!r}: expected a comma-separated list of user ids, or @FILE (one per line)")
    return ids


def dataset_prompts(data_dir: str | Path, users: str, split: str, prompter, *, history_k: int,
                    min_interactions: int, max_positions: int | None, num_image_tokens: int) -> list[PromptLine]:
    """``--data DIR --users 1,2,3 --split S`` (or ``--users @FILE``, see :func:`parse_user_ids`):
    each user's ``split`` example (its last
    ``history_k`` items before the target, oldest first) as a history prompt.

    Raises ValueError naming the flag / user / image for an unknown user, a user without a
    ``split`` example, or a missing / corrupt image.
    """
    ids = parse_user_ids(users)
    if len(set(ids)) != len(ids):
        raise ValueError(f"--users {users!r}: duplicate user id(s)")
    try:
        ds = load_dataset(data_dir, check_images=False)
    except (DataError, OSError) as e:
        raise ValueError(f"--data {data_dir}: {e}") from None
    splits = build_splits(ds, k=history_k, min_interactions=min_interactions)
    by_user = {ex.user_id: ex for ex in getattr(splits, split)}
    out, errors = [], []
    for n, uid in enumerate(ids, start=1):
        where = f"--data {data_dir} --users: user {uid!r}"
        if uid not in ds.interactions:
            errors.append(f"{where}: not in the dataset")
            continue
        ex = by_user.get(uid)
        if ex is None or not ex.history:
            errors.append(f"{where}: no {split} example (users need >= {min_interactions} interactions)")
            continue
        items = [{"item_id": i, "image": str(ds.items[i].image_path), "title": ds.items[i].title}
                 for i in ex.history]
        if any(ds.items[i].image_path is None for i in ex.history):
            errors.append(f"{where}: a history item has no image")
            continue
        try:
            h = prompter.build([(Path(it["image"]), it["title"]) for it in items])
        except DataError as e:
            errors.append(f"{where}: {e}")
            continue
        if max_positions is not None and len(h.input_ids) + num_image_tokens > max_positions:
            errors.append(f"{where}: the history of {len(items)} item(s) makes a prompt of {len(h.input_ids)} "
                          f"tokens; with the {num_image_tokens} image tokens that exceeds max_position_embeddings="
                          f"{max_positions}")
            continue
        out.append(PromptLine(n, uid, None, h.input_ids, items, h.gen_code_mask, h.pixel_values,
                              [it["image"] for it in items]))
    if len(errors) == 1:  # one problem: one line
        raise ValueError(errors[0])
    if errors:
        raise ValueError(f"{len(errors)} invalid user(s):\n" + "\n".join(errors[:20]))
    return out
