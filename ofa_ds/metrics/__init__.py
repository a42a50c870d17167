"""Evaluation metrics of OFA's tasks: CIDEr-D / BLEU / ROUGE-L for captions (pycocoevalcap-exact on the same
tokens; a Java-free PTB-style tokenizer), VQA accuracy, grounding Acc@0.5, accuracy, Gigaword ROUGE."""
from ofa_ds.metrics.caption import bleu, caption_scores, rouge_l
from ofa_ds.metrics.cider import CiderD, document_frequency, load_df, save_df
from ofa_ds.metrics.rouge import gigaword_hypothesis, rouge_scores
from ofa_ds.metrics.simple import (accuracy, box_iou, grounding_hits, normalize_vqa_answer, vqa_score,
                                   vqa_soft_score)
from ofa_ds.metrics.tokenize import ptb_tokenize_py, tokenize

__all__ = ["CiderD", "document_frequency", "load_df", "save_df", "bleu", "rouge_l", "caption_scores",
           "rouge_scores", "gigaword_hypothesis", "accuracy", "box_iou", "grounding_hits", "vqa_score",
           "vqa_soft_score", "normalize_vqa_answer", "ptb_tokenize_py", "tokenize"]
