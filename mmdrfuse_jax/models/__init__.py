"""The networks (the student, the teacher, VGG-19), their precision settings and weight files."""
