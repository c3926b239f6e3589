"""A Gradio page for trying a TAGI model without writing Python (`peft-tagi demo`; extra `peft-tagi[demo]`).

Type an instruction and some inputs: the page generates the task's adapter, shows its outputs next to the frozen
base model's, warns about words the tokenizer does not know, and offers the adapter as a zipped LoRA folder.
"""

from __future__ import annotations

import html
import re
import shutil
import tempfile
from pathlib import Path

import gradio as gr
from transformers.utils import logging

from .pipeline import generate_adapters, generate_outputs
from .tokenizer import unknown_words_message

logger = logging.get_logger(__name__)

API_NAME = "generate"  # the endpoint `gradio_client.Client(url).predict(instruction, inputs, api_name="/generate")`
MAX_INPUTS = 64  # a page is for trying a task; `peft-tagi predict` serves long files


def _folder_name(instruction: str) -> str:
    words = re.findall(r"[a-z0-9]+", instruction.lower())[:6]
    return "tagi-lora-" + ("-".join(words) or "task")


def build_demo(
    model,
    tokenizer,
    model_id: str | None = None,
    tagi_id: str | None = None,
    max_new_tokens: int = 32,
    num_beams: int = 1,
    examples: list[tuple[str, str]] | None = None,
) -> gr.Blocks:
    """The demo page for a loaded TAGI model.

    Args:
        model (`peft.PeftModel`): the TAGI model, in eval mode.
        tokenizer: the base model's tokenizer.
        model_id (`str`, *optional*): the base model's path or Hub id, shown on the page and recorded in the
            downloaded adapter.
        tagi_id (`str`, *optional*): the TAGI checkpoint's path or Hub id, likewise.
        max_new_tokens, num_beams: generation options.
        examples: (instruction, inputs one per line) pairs offered as clickable examples under the inputs.

    Returns:
        A `gradio.Blocks` with one endpoint, `/generate`: (instruction, inputs one per line) -> (adapter outputs,
        base model outputs, warnings as Markdown, zip of the LoRA folder), the outputs one per line.
    """
    downloads = Path(tempfile.mkdtemp(prefix="peft-tagi-demo-"))

    def generate(instruction: str, inputs_text: str):
        instruction = (instruction or "").strip()
        inputs = [line for line in (inputs_text or "").splitlines() if line.strip()]
        if not instruction:
            raise gr.Error("Type an instruction: a sentence that describes the task.")
        if not inputs:
            raise gr.Error("Type at least one input, one per line.")
        if len(inputs) > MAX_INPUTS:
            raise gr.Error(
                f"{len(inputs)} inputs: the page takes up to {MAX_INPUTS}; use `peft-tagi predict` for files."
            )
        warnings = [
            message
            for message in (
                # The instruction is read by the model's instruction tokenizer (its own encoder's, if it has one).
                unknown_words_message(model.base_model.instruction_tokenizer or tokenizer, instruction, "instruction"),
                unknown_words_message(tokenizer, "\n".join(inputs), "inputs"),
            )
            if message
        ]
        adapters = generate_adapters(
            model, tokenizer, [instruction], generator=tagi_id, base_model_name_or_path=model_id
        )
        adapter = adapters[instruction]
        options = {"max_new_tokens": max_new_tokens, "num_beams": num_beams, "progress": False}
        tagi_outputs = generate_outputs(model, tokenizer, inputs, lambda: model.use_adapter(adapter), **options)
        base_outputs = generate_outputs(model, tokenizer, inputs, model.disable_adapter, **options)
        # Each request gets its own folder, so concurrent users never download each other's adapter.
        request_dir = Path(tempfile.mkdtemp(dir=downloads))
        folder = adapter.save_lora(request_dir / _folder_name(instruction))
        archive = shutil.make_archive(str(folder), "zip", root_dir=request_dir, base_dir=folder.name)
        # Escaped: Markdown passes HTML through, and "<unk>" would vanish as an unknown tag (with the words after it).
        notes = "\n\n".join(f"⚠️ {html.escape(message, quote=False)}" for message in warnings) or "No unknown words."
        return "\n".join(tagi_outputs), "\n".join(base_outputs), notes, archive

    with gr.Blocks(title="peft-tagi: adapters from instructions", analytics_enabled=False) as demo:
        gr.Markdown(
            "# TAGI: a LoRA adapter from an instruction\n"
            f"Base model `{model_id or 'unknown'}`, TAGI checkpoint `{tagi_id or 'unknown'}`. Type what the task "
            "is and some inputs (one per line): the adapter is generated from the instruction alone and its outputs "
            "are shown next to the frozen base model's."
        )
        with gr.Row():
            instruction = gr.Textbox(label="Instruction", lines=2, elem_id="instruction")
            inputs = gr.Textbox(label="Inputs, one per line", lines=5, elem_id="inputs")
        if examples:
            gr.Examples(
                examples=[list(example) for example in examples],
                inputs=[instruction, inputs],
                label="Examples (click one to fill the boxes): two steps in one instruction",
                elem_id="examples",
            )
        run = gr.Button("Generate adapter and outputs", variant="primary", elem_id="run")
        with gr.Row():
            tagi_outputs = gr.Textbox(label="TAGI adapter outputs", lines=5, elem_id="tagi-outputs")
            base_outputs = gr.Textbox(label="Frozen base model outputs", lines=5, elem_id="base-outputs")
        notes = gr.Markdown(elem_id="warnings")
        archive = gr.File(label="The adapter as a LoRA folder (zip)", elem_id="adapter-zip")
        run.click(
            generate,
            inputs=[instruction, inputs],
            outputs=[tagi_outputs, base_outputs, notes, archive],
            api_name=API_NAME,
        )
    return demo


__all__ = ["API_NAME", "build_demo"]
