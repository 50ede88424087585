{#- The rows an incremental mart recomputes: `<column> <op> run_round()` on an incremental run
    given a round, else every round (first build, --full-refresh, or no round given). `op` is
    `=` for marts whose round R depends on round R alone, `>=` for a rolling mart (round R
    changes the figures of every later round that looks back over it). -#}
{% macro round_filter(column='round', op='=') -%}
    {%- if op not in ('=', '>=') -%}
        {{ exceptions.raise_compiler_error("round_filter op must be '=' or '>=', got " ~ op) }}
    {%- endif -%}
    {%- set r = run_round() -%}
    {%- if is_incremental() and r is not none -%}
        {{ column }} {{ op }} {{ r | int }}
    {%- else -%}
        true
    {%- endif -%}
{%- endmacro %}
