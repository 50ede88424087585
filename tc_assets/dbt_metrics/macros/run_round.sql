{#- The round this run rebuilds: `--vars '{round: R}'` when given (a run by hand), else the
    TC_DBT_ROUND environment variable (Dagster sets it, so that the parsed project does not
    change from round to round and dbt's partial parsing stays valid), else none (every round). -#}
{% macro run_round() -%}
    {%- set r = var('round', none) -%}
    {%- if r is none and env_var('TC_DBT_ROUND', '') != '' -%}
        {%- set r = env_var('TC_DBT_ROUND') | int -%}
    {%- endif -%}
    {{ return(r) }}
{%- endmacro %}
