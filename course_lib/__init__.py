"""course_lib: the library behind the Small LLMs course notebooks.

One module per idea: runtime (device, seeds, budgets, cache), models (the teacher, students,
generation), evaluate (perplexity, accuracy, benchmarks), train (the one training loop),
quant, distill, feedback, self_improve (the chapters), checks and exercises (feedback for learners).
"""
__version__ = "0.1.0"
