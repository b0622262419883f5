"""`facli summarize`: a folder of documents into a resumable JSONL file of summaries.

corpus reads, tokenizes and plans the documents (documents, files, planning, prompting,
row_groups); run adds the resume state, the manifest and the model, and hands the documents to
job, which summarizes them in rows (batched, strategies, faults) and records each (output,
progress, interrupt); forecast is --plan-only, the same plan with nothing run.
"""
