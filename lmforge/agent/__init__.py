"""Tool calling and agents (S5): tools with schemas, least-privilege scopes, and the agent loop.

Modules: validate (arguments against a JSON Schema), calls (how tools are shown to a
model and its calls decoded), tools (Tool, ToolRegistry, ToolScope), calculator and
python_tool (the built-in tools), loop (Agent), tool_prompts (the tool-use prompt set).
Nothing here is imported by `import lmforge`.
"""
