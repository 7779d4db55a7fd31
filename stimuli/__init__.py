"""Stimuli: activation mining, exemplar selection, feature visualization, the stimulus bank."""
