"""Rendering what the stages wrote: executed notebooks to offline HTML, the stakeholder index."""
